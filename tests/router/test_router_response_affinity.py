"""Response affinity through the router: two real replicas (one tiny engine, two API apps, each with its own
--responses-store-size store); a request that names a stored response (previous_response_id, GET / DELETE
/v1/responses/{id}, .../input_items, .../cancel) reaches the replica that keeps it, also when the router did
not see it made (then it asks each replica in turn), and an id no replica keeps gets OpenAI's 404 / 400.

The routers here pick with `Alternate`, which never sends two requests in a row to the same replica: without
response affinity every continuation would land on the replica that does not keep its response."""

from __future__ import annotations

import json
from collections.abc import Sequence

import httpx
import pytest

from meshserve.distributed.launch import free_port
from meshserve.errors import InvalidArgumentError
from meshserve.router.app import build_router_app
from meshserve.router.config import RouterConfig
from meshserve.router.policy import Policy
from meshserve.router.pool import ReplicaPool
from meshserve.router.replica import Replica
from meshserve.router.response_affinity import ResponseOwners, event_response_id
from meshserve.serve.config import ServeConfig
from tests.router.conftest import serve_in_thread, stop_all
from tests.serve.conftest import make_engine, start_server

MODEL = "tiny"
ASK = {"model": MODEL, "max_output_tokens": 3, "temperature": 0, "ignore_eos": True}


class Alternate(Policy):
    """Each pick goes to another replica than the previous pick did (the first to the first candidate)."""

    name = "alternate"

    def __init__(self) -> None:
        self.last: Replica | None = None

    def choose(self, candidates: Sequence[Replica], key: int | None = None) -> Replica:
        self.last = next((r for r in candidates if r is not self.last), candidates[0])
        return self.last


@pytest.fixture(scope="module")
def replicas(tiny_model_dir):
    allm = make_engine(tiny_model_dir("llama"))
    servers = [start_server(allm, ServeConfig(served_model_names=[MODEL], responses_store_size=8))
               for _ in range(2)]
    yield servers
    for srv in servers:
        srv.stop()
    allm.shutdown()


@pytest.fixture()
def router(replicas):
    """Factory: a fresh router over the replicas (and any extra backends), picking with Alternate."""
    started = []

    def make(extra: Sequence[str] = ()) -> httpx.Client:
        config = RouterConfig(backends=[*extra, *(r.base_url for r in replicas)], health_interval_s=60.0)
        srv = serve_in_thread(build_router_app(config, pool=ReplicaPool(config, Alternate())))
        started.append(srv)
        return httpx.Client(base_url=srv.base_url, timeout=60)

    yield make
    stop_all(started)


def _create(client: httpx.Client, **kw) -> httpx.Response:
    return client.post("/v1/responses", json={**ASK, "input": "Hello", **kw})


def _streamed_create(client: httpx.Client, **kw) -> tuple[str, str]:
    """A streamed create through the router: (the response's id from its first event, the replica's name)."""
    with client.stream("POST", "/v1/responses", json={**ASK, "input": "Hello", "stream": True, **kw}) as resp:
        assert resp.status_code == 200
        events = resp.read().split(b"\n\n")
    assert events[0].startswith(b"event: response.created")
    assert events[-2].startswith(b"event: response.incomplete")  # its last event (max_output_tokens ends it)
    return event_response_id(events[0]), resp.headers["x-meshserve-replica"]


def test_continuations_reach_the_replica_that_keeps_the_response(router):
    client = router()
    first = _create(client)
    assert first.status_code == 200, first.text
    owner = first.headers["x-meshserve-replica"]
    second = _create(client, previous_response_id=first.json()["id"], input="And then?")
    assert second.status_code == 200, second.text
    assert second.headers["x-meshserve-replica"] == owner and second.headers["x-meshserve-attempts"] == "1"
    # streamed, both ways: the stream's first event teaches the router its response's replica
    streamed_id, streamed_owner = _streamed_create(client, previous_response_id=second.json()["id"])
    assert streamed_owner == owner
    third = _create(client, previous_response_id=streamed_id, input="More?")
    assert third.status_code == 200 and third.headers["x-meshserve-replica"] == owner
    fresh_id, fresh_owner = _streamed_create(client)  # no previous response: Alternate's pick
    assert fresh_owner != owner
    fourth = _create(client, previous_response_id=fresh_id)
    assert fourth.status_code == 200 and fourth.headers["x-meshserve-replica"] == fresh_owner


def test_a_stored_response_routes_reach_its_replica(router):
    client = router()
    first = _create(client, input=[{"role": "user", "content": "Hi"}, {"role": "user", "content": "there"}])
    response_id, owner = first.json()["id"], first.headers["x-meshserve-replica"]
    got = client.get(f"/v1/responses/{response_id}")
    assert got.status_code == 200 and got.json()["id"] == response_id
    assert got.headers["x-meshserve-replica"] == owner
    items = client.get(f"/v1/responses/{response_id}/input_items", params={"limit": 1, "order": "asc"})
    assert items.status_code == 200, items.text
    assert [i["content"][0]["text"] for i in items.json()["data"]] == ["Hi"]  # the query string went through
    cancel = client.post(f"/v1/responses/{response_id}/cancel")  # its replica's answer: not cancellable
    assert cancel.status_code == 400 and cancel.json()["error"]["param"] == "response_id"
    deleted = client.delete(f"/v1/responses/{response_id}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = client.get(f"/v1/responses/{response_id}")
    assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found_error"


def test_a_router_that_did_not_see_the_response_finds_it(replicas, router):
    # made on the second replica past any router (a router since restarted, or another router worker)
    made = httpx.post(replicas[1].v1 + "/responses", json={**ASK, "input": "Hello"}, timeout=60).json()
    dead = f"http://127.0.0.1:{free_port()}"  # a replica that is down is skipped
    client = router(extra=[dead])
    got = client.get(f"/v1/responses/{made['id']}")
    assert got.status_code == 200 and got.json()["id"] == made["id"]
    assert got.headers["x-meshserve-replica"] == "primary-2" and got.headers["x-meshserve-attempts"] == "2"
    again = client.get(f"/v1/responses/{made['id']}")  # learnt: asked there at once
    assert (again.headers["x-meshserve-replica"], again.headers["x-meshserve-attempts"]) == ("primary-2", "1")
    other = httpx.post(replicas[1].v1 + "/responses", json={**ASK, "input": "Hi"}, timeout=60).json()
    streamed = router(extra=[dead]).post("/v1/responses", json={**ASK, "input": "Go on", "stream": True,
                                                                   "previous_response_id": other["id"]})
    assert streamed.status_code == 200 and streamed.headers["x-meshserve-replica"] == "primary-2"
    assert b"event: response.incomplete" in streamed.content  # its whole stream (max_output_tokens ends it)


def test_an_id_no_replica_keeps_gets_openais_error(router):
    client = router()
    continued = _create(client, previous_response_id="resp_nowhere")
    error = continued.json()["error"]
    assert continued.status_code == 400 and error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id" and continued.headers["x-meshserve-attempts"] == "2"
    for method, path in [("GET", ""), ("DELETE", ""), ("GET", "/input_items"), ("POST", "/cancel")]:
        resp = client.request(method, f"/v1/responses/resp_nowhere{path}")
        assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error", (method, path)
        assert resp.headers["x-meshserve-attempts"] == "2"


def test_response_owners_are_bounded_least_recently_used_first():
    owners = ResponseOwners(2)
    owners.learn("a", "http://r0")
    owners.learn("b", "http://r1")
    assert owners.owner("a") == "http://r0"  # a is now the most recently used
    owners.learn("c", "http://r0")
    assert len(owners) == 2 and owners.owner("b") is None and owners.owner("a") == "http://r0"
    owners.answered("DELETE", "a", "http://r0")
    assert owners.owner("a") is None
    created = b'event: response.created\ndata: ' + json.dumps(
        {"type": "response.created", "response": {"id": "resp_1"}, "sequence_number": 0}).encode() + b"\n\n"
    assert event_response_id(created) == "resp_1" and event_response_id(b"data: [DONE]\n\n") is None
    with pytest.raises(InvalidArgumentError):
        RouterConfig(backends=["http://r0"], response_affinity_size=0).validate()
