"""The router's concurrent legs over a layer-wise prefill and decode instance (real servers, gloo or NIXL/UCX
on loopback): the decode instance subscribes while the chunked prefill runs, so layers go out (or are read)
before the prefill ends; the tokens are colocated serving's, streamed or not; both sides free every block."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from meshserve.router.config import RouterConfig
from tests.conftest import VOCAB
from tests.router.conftest import metric_value, wait_until
from tests.router.test_router_disagg import (
    CONNECTORS,
    _body,
    _text,
    every_replica_admitted,
    start_prefill_and_decode,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=CONNECTORS)
def deployment(tiny_model_dir, processes, request):
    # chunked prefill (8 tokens a step): the decode instance subscribes while the prefill still runs
    return start_prefill_and_decode(tiny_model_dir, processes, ["--max-num-batched-tokens", "8"],
                                    connector=request.param, transfer_timeout_s=20, layerwise=True)


def _long_body(i: int, stream: bool = False) -> dict:
    """_body with a prompt of 190-235 tokens (max_model_len 256): 24-30 prefill steps of 8 tokens, so the decode
    instance, asked at the same time, subscribes while layers are still being computed. With _body's 20-71 tokens
    in steps of 16 (2-5 steps, ~10-20 ms on the CPU) the overlap was 0-28 ms and none in ~40% of runs
    (2026-12-05); with these, 0.02-0.23 s, none in ~10% of single rounds."""
    rng = random.Random(100 + i)
    return {**_body(i, stream), "prompt": [rng.randrange(3, VOCAB) for _ in range(190 + 15 * (i % 4))]}


def test_concurrent_legs_stream_layers_during_the_prefill(deployment, router):
    prefill, decode = deployment
    r = router(
        RouterConfig(
            backends=[decode.url], prefills=[prefill.url], disagg_concurrent=True, health_interval_s=0.2
        )
    )
    assert wait_until(lambda: every_replica_admitted(r), 10)

    def ask(i_stream):
        i, stream = i_stream
        url = r.base_url + "/v1/completions"
        return i, _text(httpx.post(url, json=_long_body(i, stream), timeout=60), stream)

    # whether the decode instance subscribes before a prefill's last layer is a race between two processes: up
    # to three rounds of four requests, each round's prompts new to both instances (a prefix hit would leave
    # nothing to overlap), until one overlaps; a broken layer-wise path overlaps in none
    during = 'meshserve:kv_transfer_streamed_seconds_total{part="during_prefill"}'
    for round_ in range(3):
        ids = range(4 * round_, 4 * round_ + 4)
        want = {i: _text(httpx.post(decode.url + "/v1/completions", json=_long_body(i), timeout=60), False)
                for i in ids}  # the colocated tokens
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, [(i, i % 2 == 1) for i in ids]))
        for i, text in got:
            assert text == want[i], i
        received = metric_value(decode.url, 'meshserve:kv_transfers_total{direction="received",outcome="ok"}')
        assert received == 4 * (round_ + 1)
        if metric_value(prefill.url, during) > 0:
            break
    assert metric_value(prefill.url, during) > 0
    assert wait_until(lambda: metric_value(prefill.url, 'meshserve:kv_transfer_blocks{state="held"}') == 0, 10)
    assert metric_value(decode.url, 'vllm:kv_cache_usage_perc{engine="0",model_name="tiny"}') == 0
