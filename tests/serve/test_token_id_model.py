"""A model without a tokenizer (dummy preset) streams its tokens, and the W3 client counts every one of them."""

import asyncio

import pytest

from meshserve.bench.serve_bench import BenchRequest, run_load
from meshserve.serve.config import ServeConfig
from tests.serve.conftest import make_engine, start_server


@pytest.fixture(scope="module")
def token_id_server():
    allm = make_engine("smollm2-135m", load_format="dummy", max_model_len=128, num_gpu_blocks_override=64)
    assert allm.tokenizer is None
    live = start_server(allm, ServeConfig(served_model_names=["dummy"]))
    yield live
    live.stop()
    allm.shutdown()


def test_streams_every_token_without_text(token_id_server):
    reqs = [BenchRequest([5, 6, 7, 8], 6) for _ in range(3)]
    results, _ = asyncio.run(run_load(token_id_server.base_url, "dummy", reqs, progress=False))
    assert all(r.ok for r in results), [r.error for r in results]
    assert all(r.output_tokens == 6 for r in results)
    # one chunk per token after the first, unless the client lagged and the server folded some together
    # (engine/output_coalescing.py); the token count above holds either way
    assert all(1 <= len(r.itls) <= 5 for r in results)
