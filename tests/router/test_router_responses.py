"""/v1/responses through the router to a real replica (the tiny model, in a thread): the whole response and
the event stream pass through as the replica sends them; a Responses stream has no [DONE], and the router
takes its last event (response.completed, .incomplete or .failed) as its end, not as a broken stream."""

from __future__ import annotations

import httpx
import pytest

from meshserve.router.config import RouterConfig
from meshserve.router.prefix import prefix_key
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import make_engine, start_server

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def replica(tiny_model_dir):
    allm = make_engine(tiny_model_dir("llama"))
    srv = start_server(allm, ServeConfig(served_model_names=["tiny"]))
    yield srv
    srv.stop()
    allm.shutdown()


def test_responses_pass_through_whole_and_streamed(replica, router):
    r = router(RouterConfig(backends=[replica.base_url], health_interval_s=60.0))
    direct = openai.OpenAI(base_url=replica.v1, api_key="x", max_retries=0)
    routed = openai.OpenAI(base_url=r.base_url + "/v1", api_key="x", max_retries=0)
    kw = {"model": "tiny", "input": "Hello", "instructions": "Be brief.", "max_output_tokens": 8, "temperature": 0}
    whole = routed.responses.create(**kw)
    assert whole.output[0].content[0].text == direct.responses.create(**kw).output[0].content[0].text
    events = list(routed.responses.create(stream=True, **kw))
    assert events[0].type == "response.created" and events[-1].type == f"response.{whole.status}"
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output[0].content[0].text
    metrics = httpx.get(r.base_url + "/metrics").text
    assert 'meshserve:router_requests_total{outcome="ok"} 2.0' in metrics
    assert 'outcome="stream_broken"} 0.0' in metrics or "stream_broken" not in metrics
    bad = httpx.post(r.base_url + "/v1/responses", json={"model": "tiny", "input": "x", "previous_response_id": "r"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "previous_response_id"


def test_responses_key_as_the_chat_request_they_are_served_as():
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]}
    assert prefix_key({"instructions": "Be brief.", "input": "Hello"}) == prefix_key(chat)
    items = {"instructions": "Be brief.", "input": [{"role": "user", "content": [{"type": "input_text",
                                                                                   "text": "Hello"}]}]}
    assert prefix_key(items) == prefix_key(chat)
    assert prefix_key({"input": "Hello"}) != prefix_key(chat)
