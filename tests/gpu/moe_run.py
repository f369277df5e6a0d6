"""Generates with a MoE preset (dummy weights, 2 layers) in a fresh process and prints the outputs as JSON.
Usage: python tests/gpu/moe_run.py MODEL DTYPE TP EP(0|1) FAST(0|1)
FAST=0 is the reference: torch attention, no fused ops (so the torch MoE loop), eager."""

from __future__ import annotations

import json
import os
import random
import sys


def prompts(n: int = 6) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(n)]


def main() -> None:
    model, dtype, tp, ep, fast = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
    if not fast:
        os.environ["MESHSERVE_ATTENTION_BACKEND"] = "torch"
        os.environ["MESHSERVE_DISABLE_FUSED_OPS"] = "1"
    from meshserve import LLM, SamplingParams

    llm = LLM(model=model, load_format="dummy", dtype=dtype, max_model_len=1024, hf_overrides={"num_hidden_layers": 2},
              gpu_memory_utilization=0.5, max_num_seqs=32, seed=0, tensor_parallel_size=tp,
              enable_expert_parallel=ep, enforce_eager=not fast)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1)
    outs = llm.generate(prompts(), greedy, use_tqdm=False)
    one = llm.generate(prompts(1), SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    result = {
        "graphs": llm.engine.runner.graphs is not None,
        "tokens": [o.outputs[0].token_ids for o in outs],
        "batch1_tokens": one[0].outputs[0].token_ids,  # batch 1: the pair-GEMV path
        "prompt_logprobs": [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outs],
        "expert_tokens": sum(sum(layer) for layer in llm.engine.stats()["expert_load"]),
    }
    llm.shutdown()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
