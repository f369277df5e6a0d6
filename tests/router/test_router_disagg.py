"""The router over a prefill instance and a decode instance (real servers; the torch connector's gloo on loopback,
the ipc connector's shared memory, and the nixl connector's UCX where NIXL is installed): the tokens are colocated serving's, streamed or not; a dead prefill instance means colocated serving, not an error; the
blocks on both sides are freed; the transfer shows in /metrics."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from meshserve.disagg.nixl_connector import nixl_available
from meshserve.router.config import RouterConfig
from tests.conftest import VOCAB
from tests.router.conftest import free_port, metric_value, replica_args, wait_until

pytestmark = pytest.mark.slow


def _kv(role: str, rank: int, port: int, connector: str = "torch", **extra) -> str:
    return json.dumps(
        {
            "kv_connector": connector,
            "kv_role": role,
            "kv_rank": rank,
            "kv_parallel_size": 2,
            "kv_ip": "127.0.0.1",
            "kv_port": port,
            "kv_connector_extra_config": {
                "backend": "gloo", "transfer_timeout_s": 5, "hold_timeout_s": 5, **extra
            },
        }
    )


def start_prefill_and_decode(tiny_model_dir, processes, prefill_args=(), connector="torch", **kv_extra):
    """A prefill (kv rank 0) and a decode instance (kv rank 1) of the tiny llama, both ready; prefill_args:
    the prefill's own flags; kv_extra: overrides of the connector's extra config (both sides)."""
    model = tiny_model_dir("llama")
    kv_port = free_port()
    extra = ["--block-size", "4", "--num-gpu-blocks-override", "300"]
    prefill = processes("prefill", [])
    prefill_kv = _kv("kv_producer", 0, kv_port, connector, **kv_extra)
    prefill.args = replica_args(model, prefill.port, ["tiny"],
                                [*extra, *prefill_args, "--kv-transfer-config", prefill_kv])
    decode = processes("decode", [])
    decode_kv = _kv("kv_consumer", 1, kv_port, connector, **kv_extra)
    decode.args = replica_args(model, decode.port, ["tiny"], [*extra, "--kv-transfer-config", decode_kv])
    prefill.start()
    decode.start()
    prefill.wait_ready()
    decode.wait_ready()
    return prefill, decode


# the connectors a deployment fixture runs over (nixl where the library is installed)
CONNECTORS = [
    "torch",
    "ipc",  # (one-sided: the decode leg reads the blocks the prefill's answer names, beside the grant)
    pytest.param(
        "nixl",
        marks=pytest.mark.skipif(
            not nixl_available(), reason="the NIXL library is not installed (pip install meshserve[nixl])"
        ),
    ),
]


@pytest.fixture(scope="module", params=CONNECTORS)
def deployment(tiny_model_dir, processes, request):
    return start_prefill_and_decode(tiny_model_dir, processes, connector=request.param)


def _prompt(i: int) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(3, VOCAB) for _ in range(20 + 17 * i)]


def _body(i: int, stream: bool = False) -> dict:
    return {
        "model": "tiny",
        "prompt": _prompt(i),
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
        "stream": stream,
    }


def _text(resp: httpx.Response, stream: bool) -> str:
    assert resp.status_code == 200, resp.text
    if not stream:
        return resp.json()["choices"][0]["text"]
    out = []
    for line in resp.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[6:])
            assert "error" not in event, event
            out.append(event["choices"][0]["text"])
    assert resp.text.rstrip().endswith("data: [DONE]")
    return "".join(out)


def every_replica_admitted(r) -> bool:
    """Whether the router has admitted all its replicas, prefill ones included: its /ready answers 200 once any
    one is healthy, and a request sent before the prefill instance is admitted runs colocated on the decode one
    (the slow suite's concurrent-legs test lost its transfers so under load)."""
    return all(replica["healthy"] for replica in httpx.get(r.base_url + "/router/replicas").json()["replicas"])


def test_disaggregated_tokens_equal_colocated_and_faults_fall_back(deployment, router):
    prefill, decode = deployment
    # colocated reference: the decode instance alone (no transfer)
    want = {
        i: _text(httpx.post(decode.url + "/v1/completions", json=_body(i), timeout=60), False)
        for i in range(6)
    }
    r = router(RouterConfig(backends=[decode.url], prefills=[prefill.url], health_interval_s=0.2))
    assert wait_until(lambda: every_replica_admitted(r), 10)

    def ask(i_stream):
        i, stream = i_stream
        return (
            i,
            stream,
            _text(httpx.post(r.base_url + "/v1/completions", json=_body(i, stream), timeout=60), stream),
        )

    with ThreadPoolExecutor(6) as pool:  # concurrent requests, half of them streamed
        got = list(pool.map(ask, [(i, i % 2 == 1) for i in range(6)]))
    for i, _, text in got:
        assert text == want[i], i
    assert metric_value(decode.url, 'meshserve:kv_transfers_total{direction="received",outcome="ok"}') == 6
    assert metric_value(decode.url, 'meshserve:kv_transfer_bytes_total{direction="received"}') > 0
    # both sides freed every block (the producer once acknowledged)
    assert wait_until(lambda: metric_value(prefill.url, 'meshserve:kv_transfer_blocks{state="held"}') == 0, 10)
    assert metric_value(decode.url, 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"}') == 0

    # the prefill instance dies: requests are served colocated on the decode instance, streamed or not
    prefill.kill()
    for i, stream in ((0, False), (1, True)):
        assert (
            _text(httpx.post(r.base_url + "/v1/completions", json=_body(i, stream), timeout=60), stream)
            == want[i]
        )
