"""vLLM's GPU kernel time in decode steps, the peer's side of tools/profile_kernels.py (same prompts, same table).

usage (device, vLLM staged by tools/vllm_stage.sh):
  . .vp4/env.sh; VLLM_ENABLE_V1_MULTIPROCESSING=0 python3 tools/vllm_profile_peer.py .vp4/MODEL BATCH [PROMPT_LEN]

The engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees its kernels,
CUDA graphs included. BATCH prompts of PROMPT_LEN random ids (random.seed(0), as profile_kernels.py), a warm-up
of 8 tokens, then 17 greedy tokens profiled: the table is the prefill plus 16 decode steps, kernels sorted by
device time, and `decode_ms_per_step` the wall time of a decode step (the best of three 17-token runs less the
best of three 1-token runs, over 16, timed without the profiler).
"""

import json
import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from vllm import LLM, SamplingParams


def main() -> None:
    model_dir, batch = sys.argv[1], int(sys.argv[2])
    prompt_len = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              gpu_memory_utilization=0.9, max_model_len=4096, seed=0, enable_prefix_caching=False)
    random.seed(0)
    prompts = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(prompt_len)]} for _ in range(batch)]

    def run(n: int) -> float:
        sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=n, detokenize=False)
        t = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        return time.perf_counter() - t

    run(8)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(17)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    # the best of three of each (one pair gave a negative step on 2026-12-03: a slow run(1) after the profiler)
    t17, t1 = min(run(17) for _ in range(3)), min(run(1) for _ in range(3))
    step = (t17 - t1) / 16
    print("RESULT " + json.dumps({"model": model_dir, "batch": batch, "prompt_len": prompt_len,
                                  "decode_ms_per_step": step * 1e3}), flush=True)


if __name__ == "__main__":
    main()
