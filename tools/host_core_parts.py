"""`bench host --waiting`'s W3 steady state, offline, timed by engine/core_timing.py's CoreTiming: the same step
parts (thread CPU) as the serving core's MESHSERVE_CORE_TIMING / frontend_server --core-timing rows, so the two
compare part by part (tools/real_core_w3.py runs the server).

    PYTHONPATH=$PWD python tools/host_core_parts.py [--step-trace FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile

from meshserve.bench import host_overhead
from meshserve.engine.core_timing import CoreTiming
from meshserve.engine.heap import freeze_startup_heap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--step-trace", default=None, help="the engine's step trace (as the serving W3 runs had)")
    cli = p.parse_args(argv)
    ns = argparse.Namespace(batch=256, prompt_len=512, steps=cli.steps, warmup=3, async_scheduling=True,
                            slo_ttft_ms=1000.0, slo_tpot_ms=50.0, kv_offload_gib=None, spec_ngram=None, waiting=150,
                            max_tokens=128, slo_prefill_chunk=1024)
    build = host_overhead._llm
    if cli.step_trace:
        host_overhead._llm = lambda *a, **kw: build(*a, **kw, step_trace=cli.step_trace)
    engine = host_overhead.build_steady_engine(ns)
    steady = host_overhead.SteadyArrivals(engine, ns)
    freeze_startup_heap()  # as the serving core does
    host_overhead._warm_up(engine, ns, steady)
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as f:
        timing = CoreTiming(engine.core, f.name)
        for _ in range(ns.steps):
            steady.top_up()
            engine.step()
            steady.tick()
        timing.write()
        rows = [json.loads(line) for line in open(f.name)]  # noqa: SIM115
    parts = {part: round(1e3 * statistics.median(r["step_parts_s"][part] for r in rows), 3)
             for part in rows[0]["step_parts_s"]}
    print(json.dumps({"step_trace": bool(cli.step_trace), "steps": len(rows),
                      "mean_running": round(statistics.fmean(r["running"] for r in rows), 1),
                      "step_cpu_ms_median": round(1e3 * statistics.median(r["step_cpu_s"] for r in rows), 3),
                      "gc_cpu_ms_mean": round(1e3 * statistics.fmean(r["gc_cpu_s"] for r in rows), 3),
                      "gc_full": sum(r["gc_full"] for r in rows),
                      **{f"step_{k}_ms_median": v for k, v in parts.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
