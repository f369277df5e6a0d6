"""The router's concurrent legs over a layer-wise prefill and decode instance (real servers, gloo or NIXL/UCX
on loopback): the decode instance subscribes while the chunked prefill runs, so layers go out (or are read)
before the prefill ends; the tokens are colocated serving's, streamed or not; both sides free every block."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from meshserve.router.config import RouterConfig
from tests.router.conftest import wait_until
from tests.router.test_router_disagg import CONNECTORS, _body, _metric, _text, start_prefill_and_decode

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=CONNECTORS)
def deployment(tiny_model_dir, processes, request):
    # chunked prefill (16 tokens a step): the decode instance subscribes while the prefill still runs
    return start_prefill_and_decode(tiny_model_dir, processes, ["--max-num-batched-tokens", "16"],
                                    connector=request.param, transfer_timeout_s=20, layerwise=True)


def test_concurrent_legs_stream_layers_during_the_prefill(deployment, router):
    prefill, decode = deployment
    want = {
        i: _text(httpx.post(decode.url + "/v1/completions", json=_body(i), timeout=60), False)
        for i in range(4)
    }
    r = router(
        RouterConfig(
            backends=[decode.url], prefills=[prefill.url], disagg_concurrent=True, health_interval_s=0.2
        )
    )
    assert wait_until(lambda: httpx.get(r.base_url + "/ready").status_code == 200, 10)

    def ask(i_stream):
        i, stream = i_stream
        url = r.base_url + "/v1/completions"
        return i, _text(httpx.post(url, json=_body(i, stream), timeout=60), stream)

    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, [(i, i % 2 == 1) for i in range(4)]))
    for i, text in got:
        assert text == want[i], i
    assert _metric(decode.url, 'meshserve:kv_transfers_total{direction="received",outcome="ok"}') == 4
    assert _metric(prefill.url, 'meshserve:kv_transfer_streamed_seconds_total{part="during_prefill"}') > 0
    assert wait_until(lambda: _metric(prefill.url, 'meshserve:kv_transfer_blocks{state="held"}') == 0, 10)
    assert _metric(decode.url, 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"}') == 0
