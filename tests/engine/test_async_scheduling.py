"""Async scheduling (step n+1 scheduled and launched before step n's tokens are read) changes no output.

Every case runs the same requests with async_scheduling on and off and compares tokens, texts and
finish reasons: greedy and seeded sampling, preemption under a tiny KV pool, stop tokens and stop strings,
n > 1, penalties (which force a drain), logprobs, max_model_len limits and aborts with a step in flight.
"""

from __future__ import annotations

import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.sequence import Sequence
from tests.conftest import VOCAB


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _run(path, prompts, params, **kw):
    results = {}
    for mode in (False, True):
        llm = LLM(model=path, async_scheduling=mode, **kw)
        assert llm.engine.async_scheduling is mode
        outs = llm.generate(prompts, params, use_tqdm=False)
        results[mode] = ([[(c.token_ids, c.text, c.finish_reason, c.stop_reason) for c in o.outputs]
                          for o in outs], llm.engine.stats())
        llm.shutdown()
    return results[False], results[True]


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama")


def test_same_tokens_greedy_and_seeded_with_preemption(path):
    prompts = [{"prompt_token_ids": _ids(i, 5 + 7 * i)} for i in range(6)]
    params = [SamplingParams(temperature=0, max_tokens=20 + i, ignore_eos=True) for i in range(3)] + \
             [SamplingParams(temperature=0.9, top_p=0.8, seed=10 + i, max_tokens=15, ignore_eos=True)
              for i in range(3)]
    (sync, _), (asyn, a_stats) = _run(path, prompts, params, block_size=4, num_gpu_blocks_override=14,
                                      max_num_batched_tokens=16)
    assert sync == asyn
    assert a_stats["num_preemptions"] > 0  # the pool is small enough to preempt under both modes


def test_stops_n_samples_penalties_logprobs(path):
    prompt = {"prompt_token_ids": _ids(3, 9)}
    free = LLM(model=path, async_scheduling=False).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    stop_tok = free.token_ids[4]
    params = [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_tok]),
        SamplingParams(temperature=0, max_tokens=12, stop=[free.text[3:8]] if len(free.text) > 8 else None),
        SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0.7, seed=2, max_tokens=10, presence_penalty=0.5, repetition_penalty=1.3,
                       ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, logprobs=3, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=6, min_tokens=5, stop_token_ids=[stop_tok]),
    ]
    (sync, _), (asyn, _) = _run(path, [prompt] * len(params), params)
    assert sync == asyn
    assert sync[0][0][2] == "stop" and len(sync[0][0][0]) <= 5


def test_max_model_len_reached_with_pending_token(path):
    prompt = {"prompt_token_ids": _ids(5, 20)}
    (sync, _), (asyn, _) = _run(path, [prompt], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True),
                                max_model_len=32)
    assert sync == asyn
    assert len(asyn[0][0][0]) == 12 and asyn[0][0][2] == "length"


def test_abort_with_a_step_in_flight(path):
    llm = LLM(model=path, async_scheduling=True)
    engine = llm.engine
    keep = engine.add_request("keep", {"prompt_token_ids": _ids(1, 6)},
                              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.add_request("drop", {"prompt_token_ids": _ids(2, 6)},
                       SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()
    engine.step()  # "drop" now has a token in flight
    assert engine.abort_request("drop")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step(finished_only=True)
    assert [o.request_id for o in outs] == [keep]
    ref = LLM(model=path, async_scheduling=False).generate(
        [{"prompt_token_ids": _ids(1, 6)}], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        use_tqdm=False)[0]
    assert outs[0].outputs[0].token_ids == ref.outputs[0].token_ids
    assert engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks


def test_scheduler_counts_pending_tokens():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                      CacheConfig(block_size=4, num_blocks=16))
    sched.async_mode = True
    seq = Sequence("a#0", "a", 0, list(range(3, 9)), SamplingParams(max_tokens=2, ignore_eos=True), max_tokens=2)
    sched.add(seq)
    first = sched.schedule()  # prefill of 6: one token pending afterwards
    assert seq.num_computed_tokens == 6 and seq.num_pending_tokens == 1
    second = sched.schedule()  # decode of the pending token before its id is known
    assert second.scheduled[0].token_ids == [-1] and second.scheduled[0].num_computed_tokens == 6
    assert seq.num_pending_tokens == 2
    assert sched.schedule().is_empty  # max_tokens = 2 outputs are both pending: nothing to schedule
    sched.update_after_step(first, {"a#0": 11})
    assert seq.output_token_ids == [11] and seq.num_pending_tokens == 1 and not seq.is_finished
    sched.update_after_step(second, {"a#0": 12})
    assert seq.output_token_ids == [11, 12] and seq.is_finished
