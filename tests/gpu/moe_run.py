"""Generates with a MoE preset (dummy weights, 2 layers) in a fresh process and prints the outputs as JSON.
Usage: python tests/gpu/moe_run.py MODEL DTYPE TP EP(0|1) FAST(0|1)
FAST=0 is the reference: torch attention, no fused ops (so the torch MoE loop), eager. The reference also reports
each prompt position's routing margin: the smallest gap, over the layers, between the logit of the k-th chosen
expert and the best one left out, in units of that row's logits' standard deviation (in bf16 two paths may
round a near tie either way and pick other experts)."""

from __future__ import annotations

import json
import os
import random
import sys


def prompts(n: int = 6) -> list[dict]:
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(rng.randint(5, 300))]} for _ in range(n)]


def record_route_margins(model) -> dict[tuple[int, int], float]:
    """Hooks on `model` (eager): {(position, token id): smallest top-k margin over the MoE layers, over the row's
    logits' standard deviation} of every row it runs; the rows' positions and ids are read from the model's own
    forward arguments."""
    margins: dict[tuple[int, int], float] = {}
    rows: list[tuple[int, int]] = []

    def take_rows(_module, args, kwargs):
        ids, pos = (args + (None, None))[:2]
        ids = kwargs.get("input_ids", ids)
        pos = kwargs.get("positions", pos)
        rows[:] = zip(pos.flatten().tolist(), ids.flatten().tolist(), strict=True)

    def take_margins(top_k):
        def hook(_module, _args, logits):
            logits = logits.float()
            top = logits.topk(top_k + 1, dim=-1).values
            gaps = (top[:, top_k - 1] - top[:, top_k]) / logits.std(dim=-1)
            for row, gap in zip(rows, gaps.tolist(), strict=True):
                margins[row] = min(gap, margins.get(row, float("inf")))
        return hook

    model.register_forward_pre_hook(take_rows, with_kwargs=True)
    for layer in model.model.layers:
        mlp = getattr(layer, "mlp", None)
        if hasattr(mlp, "gate") and hasattr(mlp, "experts"):
            mlp.gate.register_forward_hook(take_margins(mlp.experts.routing.top_k))
    return margins


def main() -> None:
    model, dtype, tp, ep, fast = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1", sys.argv[5] == "1"
    if not fast:
        os.environ["MESHSERVE_ATTENTION_BACKEND"] = "torch"
        os.environ["MESHSERVE_DISABLE_FUSED_OPS"] = "1"
    from meshserve import LLM, SamplingParams

    llm = LLM(model=model, load_format="dummy", dtype=dtype, max_model_len=1024, hf_overrides={"num_hidden_layers": 2},
              gpu_memory_utilization=0.5, max_num_seqs=32, seed=0, tensor_parallel_size=tp,
              enable_expert_parallel=ep, enforce_eager=not fast)
    margins = None if fast or tp > 1 else record_route_margins(llm.engine.runner.model)
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
    if margins is not None:  # per prompt_logprobs[1:] entry m: the routing margin of position m (its hidden state)
        result["route_margins"] = [[margins[(m, t)] for m, t in enumerate(p["prompt_token_ids"][:-1])]
                                   for p in prompts()]
    llm.shutdown()
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
