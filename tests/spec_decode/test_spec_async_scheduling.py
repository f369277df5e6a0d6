"""Speculative decoding under async scheduling changes no output and waits on the device less often.

Every case runs the same requests with async_scheduling on and off (and without speculation) and compares
tokens and finish reasons: n-gram and oracle proposals (long accepted runs and rejections), a draft model,
chunked prefill, stops and length limits inside accepted runs, preemption, and the gate turning speculation
on and off between steps. Host syncs are counted at the executor: a step's result read back before any
later step was launched leaves the device idle while the host works.
"""

from __future__ import annotations

import itertools
import random

import pytest

from meshserve import LLM, SamplingParams
from meshserve.spec_decode.replay_proposer import ReplayProposer
from tests.conftest import VOCAB

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _prompts(n: int, seed: int = 0, base: int = 20) -> list[dict]:
    rng = random.Random(seed)
    # a small alphabet, so the n-gram proposer finds matches in the prompt
    return [{"prompt_token_ids": [rng.randrange(3, 40) for _ in range(base + 7 * i)]} for i in range(n)]


class SyncCounter:
    """Counts launched steps, exposed syncs (result() of a step while it is still the newest launched) and
    rows verifying behind a verify step of their own still in flight."""

    def __init__(self, core):
        self.launches = self.exposed = self.behind = 0
        ex = core.executor
        launch_async, launch_sync = ex.execute_async, ex.execute

        def execute_async(sched_out):
            pending = launch_async(sched_out)
            self.launches += 1
            self.behind += sum(
                e.num_unverified_tokens > 0 and e.num_spec_tokens > 0 for e in sched_out.scheduled
            )
            number, read = self.launches, pending.result

            def result():
                if pending.result is result:  # first read only
                    self.exposed += number == self.launches
                    pending.result = read
                return read()

            pending.result = result
            return pending

        def execute(sched_out):
            self.launches += 1
            self.exposed += 1
            return launch_sync(sched_out)

        ex.execute_async, ex.execute = execute_async, execute

    @property
    def per_step(self) -> float:
        return self.exposed / self.launches


def _run(model, prompts, params, setup=None, **kw):
    """{async: (per-request (token ids, finish reason), stats, SyncCounter)} with async on and off."""
    results = {}
    for mode in (False, True):
        llm = LLM(model=model, block_size=4, max_model_len=256, async_scheduling=mode, **kw)
        assert llm.engine.async_scheduling is mode
        core = llm.engine.core
        if setup is not None:
            setup(core)
        syncs = SyncCounter(core)
        outs = llm.generate(prompts, params, use_tqdm=False)
        bm = core.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks  # every block (rejected slots too) came back
        results[mode] = (
            [[(c.token_ids, c.finish_reason) for c in o.outputs] for o in outs],
            llm.engine.stats(),
            syncs,
        )
        llm.shutdown()
    return results


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return tiny_model_dir("llama")


def _plain(model, prompts, params, **kw):
    llm = LLM(model=model, block_size=4, max_model_len=256, **kw)
    out = [
        [(c.token_ids, c.finish_reason) for c in o.outputs]
        for o in llm.generate(prompts, params, use_tqdm=False)
    ]
    llm.shutdown()
    return out


def test_ngram_greedy_equal_under_chunked_prefill_with_fewer_syncs(model):
    # long prompts over small chunks (prefill steps sample nothing: they go ahead), and requests of
    # different lengths finishing in the middle of others' verify steps
    prompts = _prompts(4, seed=1, base=40)
    params = [SamplingParams(temperature=0, max_tokens=8 + 5 * i, ignore_eos=True) for i in range(4)]
    expected = _plain(model, prompts, params, max_num_batched_tokens=16)
    res = _run(model, prompts, params, speculative_config=NGRAM, max_num_batched_tokens=16)
    assert res[False][0] == res[True][0] == expected
    for mode in (False, True):
        assert res[mode][1]["spec_num_draft_tokens"] > 0
    assert res[False][2].per_step == 1.0  # every step waits for its tokens
    assert res[True][2].per_step < 0.5, res[True][2].per_step


def test_oracle_runs_stops_and_preemption(model):
    """Long accepted runs and rejections (the reference replayed with mistakes), stop tokens and max_tokens
    inside accepted runs, and a KV pool small enough to preempt."""
    prompts = _prompts(4, seed=3)
    free = _plain(model, prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
    refs = {tuple(p["prompt_token_ids"]): o[0][0] for p, o in zip(prompts, free)}
    params = [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free[1][0][0][9]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=13, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[free[3][0][0][20]], ignore_eos=True),
    ]
    expected = _plain(model, prompts, params)

    def oracle(core):
        core.speculator.proposer = ReplayProposer(refs, 3, 0.2, VOCAB)
        # speculating throughout: the gate, timing this CPU, may turn off and leave only a few probes
        core.speculator.gate.step_model = None

    res = _run(model, prompts, params, setup=oracle, speculative_config=NGRAM, num_gpu_blocks_override=40)
    assert res[False][0] == res[True][0] == expected
    assert expected[1][0][1] == "stop" and expected[2][0][1] == "length"
    stats = res[True][1]
    assert stats["num_preemptions"] > 0
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"]
    assert res[True][2].behind > 0  # verify steps scheduled behind verify steps in flight
    assert res[True][2].per_step < 0.5


def test_gate_turning_on_and_off_between_steps(model):
    prompts = _prompts(3, seed=5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    expected = _plain(model, prompts, params)

    def flapping_gate(core):
        gate = core.speculator.gate
        gate.num_drafts = 10**6  # past warm-up
        pattern = itertools.cycle([True, True, False, False, False, True, False])
        gate.pays = lambda batch, context: next(pattern)

    res = _run(model, prompts, params, setup=flapping_gate, speculative_config=NGRAM)
    assert res[False][0] == res[True][0] == expected
    assert res[True][1]["spec_num_draft_tokens"] > 0
    assert res[True][2].per_step < 0.5


def test_seeded_sampling_is_reproducible(model):
    prompts = _prompts(2, seed=7)
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True)
    llm = LLM(model=model, block_size=4, max_model_len=256, speculative_config=NGRAM)
    assert llm.engine.async_scheduling
    a = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    b = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert a == b and all(len(t) == 20 for t in a)


def test_draft_model_greedy_equal(tiny_model_dir):
    target, draft = tiny_model_dir("llama"), tiny_model_dir("qwen3")
    prompts = _prompts(3, seed=9)
    params = [SamplingParams(temperature=0, max_tokens=10 + 6 * i, ignore_eos=True) for i in range(3)]
    expected = _plain(target, prompts, params, max_num_batched_tokens=24)
    spec = {"method": "draft_model", "model": draft, "num_speculative_tokens": 2}
    res = _run(target, prompts, params, speculative_config=spec, max_num_batched_tokens=24)
    assert res[False][0] == res[True][0] == expected
    assert res[True][1]["spec_num_draft_tokens"] > 0


def test_scheduler_places_verify_rows_behind_verify_steps_and_rolls_back():
    from meshserve.config import CacheConfig, SchedulerConfig
    from meshserve.engine.scheduler import Scheduler
    from meshserve.engine.sequence import Sequence

    sched = Scheduler(
        SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
        CacheConfig(block_size=4, num_blocks=16),
    )
    sched.async_mode = sched.verify_ahead = True
    seq = Sequence(
        "a", "a", 0, list(range(3, 9)), SamplingParams(max_tokens=20, ignore_eos=True), max_tokens=20
    )
    sched.add(seq)
    sched.update_after_step(sched.schedule(), {"a": 11})  # the prompt, then its first token
    seq.spec_token_ids, seq.spec_offset = [20, 21, 22], 0
    verify = sched.schedule()
    assert (
        verify.scheduled[0].token_ids == [11, 20, 21, 22] and verify.scheduled[0].num_unverified_tokens == 0
    )
    assert seq.num_computed_tokens == 10 and seq.num_pending_tokens == 4  # as if all were accepted
    seq.spec_token_ids, seq.spec_offset = [30, 31], 4  # proposed with the verify step in flight
    behind = sched.schedule()
    entry = behind.scheduled[0]
    assert entry.token_ids == [-1, 30, 31] and entry.num_computed_tokens == 10
    assert entry.num_unverified_tokens == 3 and entry.num_spec_tokens == 2
    # the verify step accepted 1 of 3: two positions back, here as on the device
    sched.update_after_step(verify, {}, {"a": [20, 99]})
    assert (
        seq.output_token_ids == [11, 20, 99] and seq.num_computed_tokens == 11 and seq.num_pending_tokens == 3
    )
    assert len(sched.block_manager.block_table(seq)) == 3  # blocks past position 10 returned to the pool
    sched.update_after_step(behind, {}, {"a": [30, 31, 55]})
    assert seq.output_token_ids == [11, 20, 99, 30, 31, 55] and seq.num_pending_tokens == 0
    assert seq.num_computed_tokens == 11 and seq.num_tokens == 12  # the new last token is next
    # proposals made for another count of pending tokens are stale: a plain decode instead
    seq.spec_token_ids, seq.spec_offset = [1, 2], 4
    assert sched.schedule().scheduled[0].token_ids == [55]


def test_sequence_swapped_out_with_its_verify_step_in_flight_resumes_with_its_verified_tokens():
    """The fuzz case of tests/engine/test_feature_combinations.py (everything on, 16-token blocks, seed 4): a
    sequence swapped out while its verify step ran reserved CPU slots for every proposal; those the step then
    rejected must give their slots back, else it resumed with fewer blocks than slots (an assertion)."""
    import torch

    from meshserve.config import CacheConfig, SchedulerConfig
    from meshserve.engine.kv_offload.copy_stream import CopyEvent
    from meshserve.engine.kv_offload.cpu_tier import CPUTier
    from meshserve.engine.kv_offload.manager import KVOffloadManager
    from meshserve.engine.scheduler import Scheduler
    from meshserve.engine.sequence import Sequence

    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64),
                      CacheConfig(block_size=4, num_blocks=16, enable_prefix_caching=False))
    offload = KVOffloadManager(CPUTier(8, (1, 2, 4, 1, 1), torch.float32, False), None, "swap")
    sched.block_manager.attach_offload(offload)
    sched.async_mode = True
    seq = Sequence("a", "a", 0, list(range(3, 8)), SamplingParams(max_tokens=20, ignore_eos=True), max_tokens=20)
    sched.add(seq)
    sched.update_after_step(sched.schedule(), {"a": 11})  # the prompt, then its first token
    seq.spec_token_ids, seq.spec_offset = [20, 21, 22], 0
    verify = sched.schedule()
    assert seq.num_computed_tokens == 9  # as if all were accepted: 3 blocks
    sched.running.remove(seq)
    sched._preempt(seq)  # swapped out with the verify step in flight: 3 slots
    assert len(offload.swapped["a"]) == 3
    sched.update_after_step(verify, {}, {"a": [99]})  # every proposal rejected: 6 tokens computed, 7 known
    assert seq.num_computed_tokens == 6 and len(offload.swapped["a"]) == 2 and len(offload.cpu.free) == 6
    for kind, block_id, _ in sched.block_manager.take_transfers():  # the swap-out's stores ran
        if kind == "store":
            offload.cpu.store_events[block_id] = CopyEvent()
    resume = sched.schedule()
    assert [(e.seq_id, e.token_ids, e.num_computed_tokens) for e in resume.scheduled] == [("a", [99], 6)]
    assert [kind for kind, _, _ in resume.kv_transfers] == ["load", "load"] and len(offload.cpu.free) == 8
    assert offload.stats.swaps_out == offload.stats.swaps_in == 1
