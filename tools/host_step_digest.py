"""Digest of every scheduled batch and every output of `bench host --waiting`'s engine over a run of steady steps,
in several feature variants: run it against two trees (PYTHONPATH=<tree> python tools/host_step_digest.py) and
compare the lines. Equal digests: the same batches (each row's tokens, positions, blocks, sampling and
speculation fields, the preemptions and finishes, the policy's credit) and the same outputs (tokens, finish
reasons, cached-token counts, the generated-token count), which is what a behaviour-preserving cut of the
engine's host work must keep.

Wall-clock inputs are fixed so that a run is deterministic: the step-time model does not learn from the fake
steps' wall times, and every step reports 1 ms of device time to the speculation gate.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import random

from meshserve.bench.host_overhead import SteadyArrivals, build_steady_engine
from meshserve.engine import runner_output

VARIANTS = [
    {},
    {"async_scheduling": False},
    {"spec_ngram": 3},
    {"slo_ttft_ms": None, "slo_tpot_ms": None, "slo_prefill_chunk": None},
    {"batch": 16, "waiting": 10},
    {"shared_prefix": True},
    {"shared_prefix": True, "async_scheduling": False},
    {"shared_prefix": True, "kv_offload_gib": 0.01, "batch": 16, "waiting": 10},
    # the prompt cap off and short outputs: many admissions a step, each asking may_admit (the running tally)
    {"slo_prefill_chunk": 0, "max_tokens": 8, "waiting": 60},
]


def digest(steps: int, **variant) -> tuple[str, int, int]:
    """(digest, prefix-cache hits, generated tokens) of one variant's run."""
    shared = variant.pop("shared_prefix", False)
    ns = argparse.Namespace(**{
        "batch": 64, "prompt_len": 100, "steps": 0, "warmup": 0, "async_scheduling": True, "slo_ttft_ms": 1000.0,
        "slo_tpot_ms": 50.0, "kv_offload_gib": None, "spec_ngram": None, "waiting": 40, "max_tokens": 30,
        "slo_prefill_chunk": 256, **variant})
    engine = build_steady_engine(ns)
    arrivals = SteadyArrivals(engine, ns)
    if shared:  # every prompt opens with the same 64 tokens: prefix-cache hits and shared blocks
        position, rng = itertools.count(), random.Random(1)
        arrivals.rng.randrange = lambda n: 7 if next(position) % ns.prompt_len < 64 else rng.randrange(n)
    core = engine.core
    core.step_model.observe = lambda *a, **k: None
    h = hashlib.sha256()
    scheduler = core.scheduler
    schedule = scheduler.schedule

    def recorded():
        out = schedule()
        for e in out.scheduled:
            seq = scheduler.seqs.get(e.seq_id)
            h.update(repr((e.seq_id, e.token_ids, e.num_computed_tokens, list(e.block_table), e.do_sample,
                           e.num_spec_tokens, e.num_output_tokens, e.num_prompt_tokens, e.prompt_token_ids is not None,
                           e.output_token_ids is not None, e.num_unverified_tokens, e.num_held_blocks,
                           seq is not None and e.params is seq.params)).encode())
        h.update(repr((out.preempted_seq_ids, out.finished_seq_ids, round(scheduler.policy.credit_s, 9))).encode())
        return out

    scheduler.schedule = recorded
    for _ in range(steps):
        arrivals.top_up()
        for o in engine.step():
            h.update(repr((o.request_id, o.finished, o.num_cached_tokens,
                           [(list(c.token_ids), c.finish_reason) for c in o.outputs])).encode())
        arrivals.tick()
    return h.hexdigest()[:16], scheduler.block_manager.stats.hits, core.num_generated_tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ns = ap.parse_args()
    runner_output.StepTimer.elapsed_s = lambda self: 0.001  # the speculation gate reads measured step times
    for variant in VARIANTS:
        print(variant, *digest(ns.steps, **dict(variant)))


if __name__ == "__main__":
    main()
