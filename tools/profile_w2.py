"""Host-side profile of W2-like steady state (64 requests of W2) plus the share of time in the GPU sync.

usage: python tools/profile_w2.py MODEL [NUM_REQUESTS]
"""

import cProfile
import pstats
import sys
import time

from meshserve import LLM, SamplingParams
from meshserve.bench.workloads import w2_requests

model = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 64
reqs = w2_requests()[:n]
llm = LLM(model=model, load_format="dummy", dtype="bfloat16", max_model_len=4096)
prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
params = [SamplingParams(temperature=0.6, max_tokens=min(r.max_tokens, 300), ignore_eos=True) for r in reqs]
llm.generate(prompts[:4], SamplingParams(max_tokens=4), use_tqdm=False)
prof = cProfile.Profile()
t = time.perf_counter()
prof.enable()
outs = llm.generate(prompts, params, use_tqdm=False)
prof.disable()
dt = time.perf_counter() - t
toks = sum(len(o.outputs[0].token_ids) for o in outs)
print(f"{model}: {n} requests, {toks} tokens in {dt:.2f} s = {toks / dt:,.0f} tok/s (under cProfile)")
pstats.Stats(prof).sort_stats("tottime").print_stats(25)
