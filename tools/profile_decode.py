"""Where a decode step's time goes: host-side (cProfile of the engine loop) vs GPU, for one model and batch.

usage: python tools/profile_decode.py MODEL BATCH [NEW_TOKENS]
"""

import cProfile
import pstats
import random
import sys
import time

import torch

from meshserve import LLM, SamplingParams

model, batch = sys.argv[1], int(sys.argv[2])
new = int(sys.argv[3]) if len(sys.argv) > 3 else 128
llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
random.seed(0)
prompts = [{"prompt_token_ids": [random.randint(0, 10000) for _ in range(128)]} for _ in range(batch)]
params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
llm.generate(prompts, params, use_tqdm=False)
torch.cuda.synchronize()
t = time.perf_counter()
llm.generate(prompts, params, use_tqdm=False)
torch.cuda.synchronize()
dt = time.perf_counter() - t
print(f"{model} batch {batch}: {batch * new / dt:,.0f} tok/s, {dt / new * 1e3:.2f} ms per step")
prof = cProfile.Profile()
prof.enable()
llm.generate(prompts, params, use_tqdm=False)
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
