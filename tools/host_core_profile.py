"""cProfile of bench host --waiting's W3 steady-state core steps (offline, with a step trace), to set beside the
serving core's MESHSERVE_CORE_PROFILE profile function by function (calls per step and time per call).

    PYTHONPATH=$PWD python tools/host_core_profile.py OUT.prof [--steps 400]
"""

from __future__ import annotations

import argparse
import cProfile
import sys
import tempfile

from meshserve.bench import host_overhead
from meshserve.engine.heap import freeze_startup_heap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=400)
    cli = p.parse_args(argv)
    ns = argparse.Namespace(batch=256, prompt_len=512, steps=cli.steps, warmup=3, async_scheduling=True,
                            slo_ttft_ms=1000.0, slo_tpot_ms=50.0, kv_offload_gib=None, spec_ngram=None, waiting=150,
                            max_tokens=128, slo_prefill_chunk=1024)
    build = host_overhead._llm
    with tempfile.NamedTemporaryFile(suffix=".jsonl") as trace:
        host_overhead._llm = lambda *a, **kw: build(*a, **kw, step_trace=trace.name)
        engine = host_overhead.build_steady_engine(ns)
        steady = host_overhead.SteadyArrivals(engine, ns)
        freeze_startup_heap()
        host_overhead._warm_up(engine, ns, steady)
        prof = cProfile.Profile()
        step = engine.core.step

        def profiled_step():  # the core's step only: the front end runs in the API processes when serving
            prof.enable()
            try:
                return step()
            finally:
                prof.disable()

        engine.core.step = profiled_step
        for _ in range(ns.steps):
            steady.top_up()
            engine.step()
            steady.tick()
        prof.dump_stats(cli.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
