"""The light stand-ins decide as the engine's own objects do (without prefix caching)."""

from __future__ import annotations

import random

from meshserve.config import CacheConfig, SchedulerConfig
from meshserve.engine.block_manager import BlockManager
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.sequence import Sequence
from meshserve.sampling import SamplingParams
from meshserve.simulator.light import CountingBlockManager, LightScheduler, SimSequence

_PARAMS = SamplingParams(temperature=0.0, ignore_eos=True)


def _pair(i: int, prompt_len: int, max_tokens: int) -> tuple[Sequence, SimSequence]:
    real = Sequence(seq_id=str(i), request_id=str(i), index=0, prompt_token_ids=list(range(prompt_len)),
                    params=_PARAMS, max_tokens=max_tokens, arrival_time=float(i))
    return real, SimSequence.make(str(i), prompt_len, _PARAMS, max_tokens, float(i))


def test_sim_sequence_counts_like_a_sequence():
    real, light = _pair(0, 37, 10)
    for _ in range(5):
        real.output_token_ids.append(1)
        light.output_token_ids.append(1)
    real.num_pending_tokens = light.num_pending_tokens = 1
    for attr in ("num_tokens", "num_known_tokens", "num_prompt_tokens", "num_output_tokens"):
        assert getattr(real, attr) == getattr(light, attr)
    assert len(real.token_ids_slice(30, 44)) == len(light.token_ids_slice(30, 44)) == 14


def test_counting_block_manager_allocates_and_frees_as_the_block_manager():
    """Random allocations (some too large for what is free), computed tokens moving on, frees: the same
    answers and the same free count at every step, block tables as long."""
    rng = random.Random(0)
    real_bm, light_bm = BlockManager(64, 16, enable_prefix_caching=False), CountingBlockManager(64, 16)
    live: list[tuple[Sequence, SimSequence]] = []
    refused = 0
    for i in range(3000):
        op = rng.random()
        if op < 0.25 or not live:
            live.append(_pair(i, rng.randint(1, 200), 50))
        elif op < 0.85:
            real, light = rng.choice(live)
            n, lookahead = rng.randint(1, 120), rng.choice([0, 0, 3])
            ok = real_bm.allocate(real, n, num_lookahead_tokens=lookahead)
            assert light_bm.allocate(light, n, num_lookahead_tokens=lookahead) is ok
            refused += not ok
            if ok:
                real.num_computed_tokens += n
                light.num_computed_tokens += n
            assert len(real_bm.block_table(real)) == len(light_bm.block_table(light))
        else:
            real, light = live.pop(rng.randrange(len(live)))
            real_bm.free(real)
            light_bm.free(light)
        assert real_bm.num_free_blocks == light_bm.num_free_blocks
    assert refused > 100  # the pool ran dry often


def test_light_scheduler_schedules_as_the_scheduler():
    """The same requests through both schedulers, a small pool forcing preemption: the same batches."""
    sched_cfg = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024,
                                async_scheduling=False)
    cache_cfg = CacheConfig(block_size=16, enable_prefix_caching=False, num_blocks=40)
    real, light = Scheduler(sched_cfg, cache_cfg), LightScheduler(sched_cfg, cache_cfg)
    for i in range(12):
        a, b = _pair(i, 60 + 17 * i, 40 + 5 * i)
        real.add(a)
        light.add(b)
    preempted = 0
    while real.has_unfinished():
        out_r, out_l = real.schedule(), light.schedule()
        assert [(e.seq_id, e.num_computed_tokens, e.num_new_tokens, e.do_sample) for e in out_r.scheduled] == \
            [(e.seq_id, e.num_computed_tokens, e.num_new_tokens, e.do_sample) for e in out_l.scheduled]
        assert out_r.preempted_seq_ids == out_l.preempted_seq_ids
        preempted += len(out_r.preempted_seq_ids)
        sampled = {e.seq_id: 1 for e in out_r.scheduled if e.do_sample}
        real.update_after_step(out_r, sampled)
        light.update_after_step(out_l, sampled)
    assert not light.has_unfinished() and preempted > 0
