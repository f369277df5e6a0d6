"""Host time of steps carrying thousands of prompt tokens (CPU, model removed): `bench host --waiting`'s steady
state with short outputs, so every step admits many prompts under the static 8,192-token budget (by default no
targets; --slo-ttft-ms / --slo-tpot-ms / --slo-prefill-chunk 0 set the serving W3 runs' policy). Reports, per step, the core's thread CPU
time by part (the core's add_request for the step's arrivals, schedule, prepare, the rest of launch, process,
stats), the prompt tokens the step computes, and us per prompt token (with a line fitted over the steps when
their prompt loads differ: e.g. --max-tokens 128, whose admissions come in bursts); --profile FILE dumps a
cProfile of the core's work (add_request + step) over the measured steps.

    PYTHONPATH=$PWD python tools/host_prefill_steps.py [--steps 40] [--waiting 64] [--max-tokens 16] [--profile F]
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import sys
from collections import defaultdict

import numpy as np

from meshserve.bench import host_overhead
from meshserve.engine.heap import freeze_startup_heap

PARTS = ("add", "schedule", "prepare", "launch", "process", "stats")


def _profiled(fn, prof: cProfile.Profile | None):
    """fn, profiled while it runs (the core's work only: not the arrivals' prompts, not the front end)."""
    if prof is None:
        return fn

    def wrapper(*args, **kwargs):
        prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            prof.disable()
    return wrapper


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--waiting", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--async-scheduling", action="store_true")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="targets, as the serving W3 runs had them")
    p.add_argument("--slo-tpot-ms", type=float, default=None)
    p.add_argument("--slo-prefill-chunk", type=int, default=None, help="with targets: 0 lifts the prompt cap")
    p.add_argument("--profile", default=None)
    cli = p.parse_args(argv)
    ns = argparse.Namespace(batch=cli.batch, prompt_len=cli.prompt_len, steps=cli.steps, warmup=3,
                            async_scheduling=cli.async_scheduling, slo_ttft_ms=cli.slo_ttft_ms,
                            slo_tpot_ms=cli.slo_tpot_ms, kv_offload_gib=None, spec_ngram=None, waiting=cli.waiting,
                            max_tokens=cli.max_tokens,
                            slo_prefill_chunk=cli.slo_prefill_chunk)
    engine = host_overhead.build_steady_engine(ns)
    steady = host_overhead.SteadyArrivals(engine, ns)
    freeze_startup_heap()
    host_overhead._warm_up(engine, ns, steady)
    core, runner = engine.core, engine.runner
    acc: dict[str, float] = defaultdict(float)
    prompt_tokens = [0]
    schedule = core._schedule

    def counted_schedule():
        out = schedule()
        # prompt tokens: every scheduled token that is not a decode's (one new token, or proposals + one)
        prompt_tokens[0] += sum(s.num_new_tokens for s in out.scheduled if not s.do_sample or s.num_new_tokens > 1)
        return out

    core._schedule = host_overhead._timed(counted_schedule, "schedule", acc)
    core._process = host_overhead._timed(core._process, "process", acc)
    core.scheduler_stats = host_overhead._timed(core.scheduler_stats, "stats", acc)
    runner._prepare = host_overhead._timed(runner._prepare, "prepare", acc)
    runner.launch = host_overhead._timed(runner.launch, "launch", acc)
    prof = cProfile.Profile() if cli.profile else None
    core.add_request = host_overhead._timed(_profiled(core.add_request, prof), "add", acc)
    core.step = host_overhead._timed(_profiled(core.step, prof), "core", acc)
    rows = defaultdict(list)
    for _ in range(cli.steps):
        acc.clear()
        prompt_tokens[0] = 0
        steady.top_up()  # the arrivals' prompt generation is not the core's: only add_request is counted
        engine.step()  # the front end's output processing runs in the API processes when serving: not counted
        core_s = acc["core"]
        steady.tick()
        acc["launch"] -= acc["prepare"]
        for name in PARTS:
            rows[name].append(acc[name])
        rows["other"].append(core_s - sum(acc[n] for n in PARTS if n != "add"))
        rows["total"].append(core_s + acc["add"])
        rows["prompt_tokens"].append(prompt_tokens[0])
    n = cli.steps
    tok = sum(rows["prompt_tokens"])
    print(f"steps {n}  prompt tokens/step mean {tok / n:.0f} (min {min(rows['prompt_tokens'])}, "
          f"max {max(rows['prompt_tokens'])})")
    # with steps of different prompt loads (bursty admissions), a least-squares line per part: its slope is the
    # part's cost per prompt token, its intercept the cost of a step without prompt tokens
    x = np.array(rows["prompt_tokens"], dtype=float)
    fit = x.max() - x.min() > x.mean() / 2  # loads spread wide enough for a slope
    print(f"{'part':10s} {'mean ms':>9s} {'median ms':>10s} {'us/prompt tok':>14s}"
          + (f" {'fit us/tok':>11s} {'fit ms at 0':>12s}" if fit else ""))
    for name in (*PARTS, "other", "total"):
        v = rows[name]
        line = f"{name:10s} {1e3 * sum(v) / n:9.3f} {1e3 * statistics.median(v):10.3f} {1e6 * sum(v) / tok:14.3f}"
        if fit:
            slope, intercept = np.polyfit(x, np.array(v), 1)
            line += f" {1e6 * slope:11.4f} {1e3 * intercept:12.3f}"
        print(line)
    if prof:
        prof.dump_stats(cli.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
