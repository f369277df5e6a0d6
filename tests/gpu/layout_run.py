"""Generates with one parallel layout in a fresh process and prints the outputs as JSON (the multi-GPU tests
start one per layout: each needs its own torch.distributed world). Usage:
python tests/gpu/layout_run.py MODEL DTYPE TP PP ALL_REDUCE(auto|nccl|fused-norm|fused-push)
    [PIPELINE_DEPTH [NUM_PROMPTS [PP_TOKEN_HANDOFF(0|1)]]]
(fused-*: the one-shot all-reduce with MESHSERVE_TP_FUSED_NORM=pull|push in the environment, set by the caller)"""

from __future__ import annotations

import json
import random
import sys


def prompts(n: int = 6) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(n)]


def main() -> None:
    from meshserve import LLM, SamplingParams
    from meshserve.distributed.parallel_state import get_parallel_state
    from meshserve.distributed.symm_mem_all_reduce import SymmMemAllReduce

    fused_calls = []  # rank 0's fused all-reduce + norm kernel calls (eager and captured)
    fused = SymmMemAllReduce.all_reduce_rms_norm

    def counting(self, *args):
        fused_calls.append(1)
        return fused(self, *args)

    SymmMemAllReduce.all_reduce_rms_norm = counting

    model, dtype, tp, pp, all_reduce = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    depth = int(sys.argv[6]) if len(sys.argv) > 6 else 0
    num_prompts = int(sys.argv[7]) if len(sys.argv) > 7 else 6
    handoff = len(sys.argv) > 8 and sys.argv[8] == "1"
    llm = LLM(model=model, load_format="dummy", dtype=dtype, max_model_len=1024, hf_overrides={"num_hidden_layers": 4},
              gpu_memory_utilization=0.5, max_num_seqs=32, seed=0, tensor_parallel_size=tp,
              pipeline_parallel_size=pp, pipeline_depth=depth, disable_custom_all_reduce=all_reduce == "nccl",
              pp_token_handoff=handoff)
    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, prompt_logprobs=1, logprobs=1)
    seeded = SamplingParams(temperature=0.8, seed=7, max_tokens=16, ignore_eos=True)
    outs = llm.generate(prompts(num_prompts), greedy, use_tqdm=False)
    sampled = llm.generate(prompts(min(2, num_prompts)), seeded, use_tqdm=False)
    result = {
        "graphs": llm.engine.runner.graphs is not None,
        "fast_all_reduce": get_parallel_state().tp_fast_all_reduce is not None,
        "async": llm.engine.async_scheduling,
        "gemv": llm.engine.runner.kernels.gemv,
        "fused_norm_calls": len(fused_calls),
        "pipeline_depth": llm.engine.core.pipeline_depth,
        "handoff_lag": llm.engine.core.scheduler.handoff_lag,
        # per rank: its pipeline stage's steps that replayed a graph / ran eagerly ([] unsplit)
        "stage_counts": llm.engine.core.executor.gather_rpc("stage_counts") if pp > 1 else [],
        "tokens": [o.outputs[0].token_ids for o in outs],
        "sampled": [o.outputs[0].token_ids for o in sampled],
        # per prompt: logprob of each prompt token, then the best logprob of each generated position
        "prompt_logprobs": [[next(iter(p.values())).logprob for p in o.prompt_logprobs[1:]] for o in outs],
        "best_logprobs": [[max(lp.logprob for lp in pos.values()) for pos in o.outputs[0].logprobs] for o in outs],
    }
    llm.shutdown()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
