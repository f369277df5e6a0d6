"""GPU kernel time of decode steps (eager, so every kernel is visible), sorted by device time.

usage: python tools/profile_kernels.py MODEL BATCH [--graphs] [--prompt-len N] [--temperature T] [--quantization Q]

With --graphs the decode steps replay CUDA graphs (kernels still show; the step time then includes no
launch overhead, so comparing it with the kernel sum gives the gaps between kernels).
"""

import random
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from meshserve import LLM, SamplingParams

model, batch = sys.argv[1], int(sys.argv[2])
graphs = "--graphs" in sys.argv
prompt_len = int(sys.argv[sys.argv.index("--prompt-len") + 1]) if "--prompt-len" in sys.argv else 128
temperature = float(sys.argv[sys.argv.index("--temperature") + 1]) if "--temperature" in sys.argv else 0.0
quantization = sys.argv[sys.argv.index("--quantization") + 1] if "--quantization" in sys.argv else None
llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096, enforce_eager=not graphs,
          quantization=quantization)
random.seed(0)
prompts = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(prompt_len)]} for _ in range(batch)]
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=17, ignore_eos=True), use_tqdm=False)
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22, max_name_column_width=60))
torch.cuda.synchronize()
t = time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=65, ignore_eos=True), use_tqdm=False)
t65 = time.perf_counter() - t
t = time.perf_counter()
llm.generate(prompts, SamplingParams(temperature=temperature, max_tokens=1, ignore_eos=True), use_tqdm=False)
t1 = time.perf_counter() - t
print(f"decode step wall time (graphs={graphs}): {(t65 - t1) / 64 * 1e3:.3f} ms at batch {batch}")
