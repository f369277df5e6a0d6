"""`meshserve bench host`: the engine's host-side time per step at a given batch, with the model removed.

Scheduling, batch preparation (the runner's real `_prepare`), token bookkeeping, stop checks and output
assembly all run as in a real step; only the forward pass and sampling are replaced by an instant fake, so
the figure is what every GPU step pays on the CPU, to compare with the GPU step time. It is measured with
async scheduling off (the same work; with it on, the work overlaps the GPU's next step instead of adding).
"""

from __future__ import annotations

import argparse
import random
import time

from meshserve.bench.fake_executor import NoModelExecutor
from meshserve.bench.report import print_table


def run_host_overhead(ns) -> dict:
    from meshserve import LLM, SamplingParams

    llm = LLM(model="smollm2-135m", load_format="dummy", max_model_len=ns.prompt_len + ns.steps + 8,
              max_num_seqs=ns.batch, hf_overrides={"num_hidden_layers": 1}, device="cpu", async_scheduling=False,
              num_gpu_blocks_override=ns.batch * ((ns.prompt_len + ns.steps + 8) // 16 + 2))
    engine = llm.engine
    fake = NoModelExecutor(engine.runner)
    engine.core.executor = fake
    random.seed(0)
    params = SamplingParams(temperature=0, max_tokens=ns.steps + 4, ignore_eos=True)
    for _ in range(ns.batch):
        engine.add_request(None, [random.randint(0, 10000) for _ in range(ns.prompt_len)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.seqs.values()):
        engine.step()  # prefill
    fake.prepare_s = 0.0
    t = time.perf_counter()
    for _ in range(ns.steps):
        engine.step()
    total = time.perf_counter() - t
    return {"bench": "host overhead per decode step", "batch": ns.batch, "steps": ns.steps,
            "step_ms": 1e3 * total / ns.steps, "prepare_ms": 1e3 * fake.prepare_s / ns.steps,
            "schedule_update_output_ms": 1e3 * (total - fake.prepare_s) / ns.steps}


def add_host_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("host", help="engine host-side time per decode step, model removed (CPU)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=50)
    p.set_defaults(func=lambda ns: print_table(run_host_overhead(ns)) or 0)
