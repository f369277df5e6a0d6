"""The multi-turn KV offload workload: fixed draws, histories that grow by the server's own answers, and on a
tiny GPU pool a CPU tier that serves more of the re-sent prefixes than the GPU pool alone."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from meshserve.bench.multiturn import cache_counters, measure, run_conversations, warm_up
from meshserve.bench.multiturn_workload import MultiTurnSpec, multiturn_conversations

# 8 conversations of up to 152 tokens (10 blocks of 16) against a GPU pool of 16 blocks: ~5x oversubscribed
TINY = MultiTurnSpec(conversations=8, turns=3, first_len=96, user_len=16, answer_len=8, think_mean_s=0.05,
                     start_rate=50.0, max_token_id=300)


def test_draws_are_fixed_and_documented():
    a, b = multiturn_conversations(TINY), multiturn_conversations(TINY)
    assert a == b
    assert a != multiturn_conversations(MultiTurnSpec(**{**TINY.__dict__, "seed": 27}))
    assert len(a) == 8 and all(c.turns == 3 and len(c.opening) == 96 for c in a)
    assert all(len(u) == 16 and all(3 <= i <= 300 for i in u) for c in a for u in c.user_turns)
    assert [c.start_at for c in a] == sorted(c.start_at for c in a) and a[0].start_at > 0
    assert all(len(c.think_s) == 2 and all(t >= 0 for t in c.think_s) for c in a)
    assert a[0].final_prompt_len == 96 + 2 * (16 + 8) and TINY.max_model_len == 152
    assert TINY.live_prefix_tokens() == 8 * 152
    # the documented order: openings and user turns, then start gaps, then think times
    import random

    random.seed(26)
    assert a[0].opening == [random.randint(3, 300) for _ in range(96)]
    with pytest.raises(ValueError):
        multiturn_conversations(MultiTurnSpec(start_rate=0))


def _serve(model_dir: str, **engine_kwargs):
    import uvicorn

    from meshserve.config import EngineArgs
    from meshserve.distributed.launch import free_port
    from meshserve.engine.async_engine import AsyncLLM
    from meshserve.serve.config import ServeConfig
    from meshserve.serve.openai_api import build_app

    allm = AsyncLLM.from_engine_args(EngineArgs(model=model_dir, max_model_len=TINY.max_model_len,
                                                num_gpu_blocks_override=16, max_num_seqs=4, **engine_kwargs))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(allm, ServeConfig(served_model_names=["bench"])),
                                           host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "test server did not start"
        time.sleep(0.01)

    def stop():
        server.should_exit = True
        thread.join(10)
        allm.shutdown()

    return f"http://127.0.0.1:{port}", stop


@pytest.fixture(scope="module")
def no_offload(tiny_model_dir):
    url, stop = _serve(tiny_model_dir("llama"))
    yield url
    stop()


def test_each_turn_resends_the_conversation_with_the_servers_answer(no_offload):
    convs = multiturn_conversations(TINY)[:3]
    turns, duration, unsent = asyncio.run(run_conversations(no_offload, "bench", convs))
    assert unsent == 0 and duration > 0 and len(turns) == 9
    assert all(t.result.ok and len(t.result.token_ids) == 8 for t in turns)
    by = {(t.conversation, t.turn): t for t in turns}
    for c, conv in enumerate(convs):
        assert by[c, 0].prompt == conv.opening
        for turn in (1, 2):
            prev = by[c, turn - 1]
            assert by[c, turn].prompt == prev.prompt + prev.result.token_ids + conv.user_turns[turn - 1]
            assert by[c, turn].result.prompt_tokens == len(by[c, turn].prompt)


def test_warm_up_runs_two_conversations_of_its_own(no_offload):
    from meshserve.bench.local_server import scrape

    before = cache_counters(scrape(no_offload))
    warm_up(no_offload, TINY)
    after = cache_counters(scrape(no_offload))
    # four turns' prompts admitted; the second turns hit their openings (nothing else runs meanwhile)
    assert after["queries"] - before["queries"] == 2 * 96 + 2 * (96 + 8 + 16)
    assert after["hits"] - before["hits"] >= 2 * 96 // 16 * 16


def test_a_turn_past_the_deadline_is_not_sent(no_offload):
    convs = multiturn_conversations(TINY)[:2]
    turns, _, unsent = asyncio.run(run_conversations(no_offload, "bench", convs, max_duration_s=0.0))
    assert turns == [] and unsent == 6


def test_cpu_tier_serves_more_of_the_prefixes_than_the_gpu_pool_alone(no_offload, tiny_model_dir):
    convs = multiturn_conversations(TINY)
    plain = measure(no_offload, convs, ttft_slo=5.0, tpot_slo=1.0)
    url, stop = _serve(tiny_model_dir("llama"), kv_offloading_size=0.005)  # ~400 blocks: holds everything
    try:
        cpu = measure(url, convs, ttft_slo=5.0, tpot_slo=1.0)
    finally:
        stop()
    for row in (plain, cpu):
        assert row["completed"] == 24 and row["failed"] == 0 and row["turns_unsent"] == 0
        assert row["prefix_hit_rate"] == pytest.approx(row["usage_cached_frac"], abs=0.02)
    assert plain["kv_offload_cpu_hit_blocks"] == 0 and cpu["kv_offload_cpu_hit_blocks"] > 0
    # turns 1 and 2 re-send ~100-150 cached tokens of ~120-150: with every prefix kept, ~60% of all prompt
    # tokens hit; the 16-block pool alone loses most of them to the other conversations
    assert cpu["prefix_hit_rate"] > 0.5
    assert cpu["prefix_hit_rate"] > plain["prefix_hit_rate"] + 0.1


def test_cache_counters_read_the_prefix_and_tier_series():
    engine = '{engine="0",model_name="m"}'
    samples = {f"vllm:prefix_cache_hits_total{engine}": 3.0, f"vllm:external_prefix_cache_hits_total{engine}": 2.0,
               f"vllm:prefix_cache_queries_total{engine}": 9.0, 'meshserve:kv_offload_hits_total{tier="cpu"}': 2.0}
    assert cache_counters(samples) == {"hits": 5.0, "queries": 9.0, "cpu_hits": 2.0, "disk_hits": 0.0}
