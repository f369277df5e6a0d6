"""vLLM 0.26's n-gram speculation as the peer of `meshserve bench spec --w1` (issue 22), on the GPU machine.

W1's prompt (128 ids, random.seed(0), as ../shared/tools/vllm-peer/bench.py and meshserve's w1_prompt draw it),
greedy, 256 new tokens, dummy weights, at batch 1 and 64 (a distinct first id per row, as meshserve's --w1
does): tok/s without speculation, then with {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min":
2, "prompt_lookup_max": 4} for each k, each engine fresh; whether the greedy tokens stayed identical, and
vLLM's acceptance. The workloads differ by the dummy weights: vLLM's (uniform +-1e-3, norms too) make a
continuation that repeats itself, where n-gram hits nearly every step (2026-12-01, H200: 2.96x at batch 1,
1.77x at batch 64, k=4); meshserve's N(0, 0.02) with unit norms do not repeat, so its --w1 proposes nothing.
Compare at equal acceptance instead: `meshserve bench spec --replay P --replay-k 4` at the P whose mean
accepted length matches the one printed here.

usage (after staging vLLM, ../shared/tools/vllm-peer/README.md):
  . .vp4/env.sh && python3 tools/vllm_spec_peer.py .vp4/llama-3.1-8b [--k 2,4] [--batch 1,64]
Prints one `RESULT {...}` line per (batch, k).
"""

import argparse
import gc
import json
import random
import time


def w1_prompt() -> list[int]:
    random.seed(0)
    return [random.randint(0, 10000) for _ in range(128)]


def run(model_dir: str, batch: int, spec: dict | None, max_tokens: int):
    import torch
    from vllm import LLM, SamplingParams

    extra = {"speculative_config": spec} if spec else {}
    llm = LLM(model=model_dir, load_format="dummy", skip_tokenizer_init=True, dtype="bfloat16",
              gpu_memory_utilization=0.85, max_model_len=4096, seed=0, disable_log_stats=False, **extra)
    ids = w1_prompt()[1:]
    prompts = [{"prompt_token_ids": [i + 1, *ids]} for i in range(batch)]
    sp = SamplingParams(temperature=0.0, ignore_eos=True, max_tokens=max_tokens, detokenize=False)
    llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True, detokenize=False), use_tqdm=False)
    best, outs = 1e9, None
    for _ in range(2):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    stats = spec_stats(llm) if spec else {}
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return tokens, best, stats


def spec_stats(llm) -> dict:
    """vLLM's own speculation counters (v1 metrics, every generate of this engine, warm-up included): the
    acceptance to match with `meshserve bench spec --replay P` when comparing at equal acceptance (its dummy
    weights, uniform +-1e-3, make a repetitive continuation where n-gram hits; meshserve's N(0, 0.02) do not)."""
    c = {m.name: m.value for m in llm.get_metrics() if hasattr(m, "value")}
    drafts, proposed = c.get("vllm:spec_decode_num_drafts", 0), c.get("vllm:spec_decode_num_draft_tokens", 0)
    accepted = c.get("vllm:spec_decode_num_accepted_tokens", 0)
    return {
        "drafts": drafts,
        "acceptance_rate": round(accepted / proposed, 3) if proposed else None,
        "mean_accepted_len": round(1 + accepted / drafts, 2) if drafts else None,
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--k", default="2,4")
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--max-tokens", type=int, default=256)
    ns = ap.parse_args()
    for batch in (int(b) for b in ns.batch.split(",")):
        ref, ref_s, _ = run(ns.model_dir, batch, None, ns.max_tokens)
        n_ref = sum(map(len, ref))
        for k in (int(k) for k in ns.k.split(",")):
            spec = {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 2, "prompt_lookup_max": 4}
            out, s, stats = run(ns.model_dir, batch, spec, ns.max_tokens)
            n = sum(map(len, out))
            print("RESULT " + json.dumps({
                "engine": "vllm", "method": "ngram", "k": k, "batch": batch, "base_tok_s": round(n_ref / ref_s, 1),
                "spec_tok_s": round(n / s, 1), "speedup": round(ref_s / s * n / n_ref, 3), "identical": out == ref, **stats,
            }), flush=True)


if __name__ == "__main__":
    main()
