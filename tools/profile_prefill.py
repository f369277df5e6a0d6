"""GPU kernel time of W2's prefill phase, sorted by device time: where a prefill step of ~8k tokens goes.

usage: python tools/profile_prefill.py MODEL [--requests N] [--quantization Q] [--kv-cache-dtype D]

W2's first N prompts (default all 256: ~143k tokens, the 18 prefill steps of 8,192 tokens of a W2 run), each with
max_tokens 1 at W2's temperature, so every step is a prefill step (chunked at max_num_batched_tokens, as in W2,
whose steps also carry the decode rows of the prompts before them: up to ~3% of their tokens).
Prints the profiler's kernel table (device time over all steps), the unprofiled wall time, the kernels' summed device
time and the phase's FLOPs floor (tools/step_floor.py's: the layers' weights x tokens, the LM head's x prompts, at
the dense bf16 peak; attention left out: a lower bound).
Why: the fiftieth session's W2 step traces put the 8B's prefill steps at 1.73x that floor (3.55 s of 13.5 s: ~600
TFLOP/s) and Qwen3-0.6B's at 3.4x (0.44 s of 5.2 s); which kernels hold the excess decides the lever.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from meshserve import LLM, SamplingParams
from meshserve.bench.workloads import W2_TEMPERATURE, w2_requests
from meshserve.engine.step_time import DeviceRates
from meshserve.planner.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--quantization", default=None)
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--rows", type=int, default=25, help="kernel table rows")
    ns = ap.parse_args()
    reqs = w2_requests()[: ns.requests]
    llm = LLM(model=ns.model, load_format="dummy", dtype="bfloat16", max_model_len=4096,
              quantization=ns.quantization, kv_cache_dtype=ns.kv_cache_dtype, enable_prefix_caching=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    one = SamplingParams(temperature=W2_TEMPERATURE, max_tokens=1, ignore_eos=True)
    llm.generate(prompts, one, use_tqdm=False)  # warm: every prefill shape compiled and the allocator grown
    torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, one, use_tqdm=False)
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, one, use_tqdm=False)
        torch.cuda.synchronize()
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=ns.rows, max_name_column_width=70))
    device_s = sum(e.self_device_time_total for e in events) / 1e6
    tokens = sum(len(r.prompt_token_ids) for r in reqs)
    spec = load_model(ns.model)
    peak = DeviceRates.detect("cuda", "bfloat16").flops  # the planner's catalog (989 TFLOP/s on an H100/H200)
    floor = spec.matmul_flops(tokens, len(reqs)) / peak
    print(f"{ns.model}: {len(reqs)} prompts, {tokens:,} tokens (~{-(-tokens // 8192)} steps of 8,192); wall "
          f"{wall:.3f} s unprofiled, device {device_s:.3f} s profiled (kernels summed)")
    print(f"FLOPs floor (the layers' {spec.body_matmul_params / 1e9:.2f} B params a token, the LM head's a prompt, at "
          f"{peak / 1e12:.0f} TFLOP/s; attention left out): {floor:.3f} s; wall / floor {wall / floor:.2f}x")


if __name__ == "__main__":
    main()
