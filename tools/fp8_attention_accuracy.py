"""What attention on fp8 tensor cores would cost in accuracy, on the real embedded model, before any kernel: the
fp8-KV engine's torch attention (kernels/attention_ref.paged_attention_ref) replaced by one that also rounds the
query (per token and head, scaled to e4m3's range) and the unnormalized probabilities exp(s - max) (in (0, 1],
unscaled) to e4m3, as FlashAttention-3's fp8 path feeds its QK^T and PV tensor-core products; the row sums stay
fp32. K and V are the fp8 cache's own values either way. The rows are quant_accuracy's (perplexity over the
shipped text, mean |delta logprob| against the fp32 reference, greedy agreement).

usage: python tools/fp8_attention_accuracy.py [--dtype float32] [--window 512] [--max-tokens 32]
       [--p-scale 1.0] [--rounded qp]   (P x p-scale before rounding; rounded: which of q and P are rounded)
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from meshserve.kernels import attention_ref

E4M3_MAX = 448.0


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp8_products_attention_ref(query, kv_cache, meta, scale, sliding_window=None, k_scale=1.0, v_scale=1.0,
                               p_scale: float = 1.0, rounded: str = "qp"):
    """paged_attention_ref's contract with q and P (rounded: "q", "p" or both) rounded to e4m3 before their
    products (fp32 otherwise)."""
    out = torch.zeros_like(query)
    num_heads, num_kv_heads = query.shape[1], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    starts = meta.query_start_loc_cpu
    for i, seq_len in enumerate(meta.seq_lens_cpu):
        q = query[starts[i] : starts[i + 1]].float()  # [q_len, H, D]
        q_len = q.shape[0]
        if q_len == 0:
            continue
        k, v = attention_ref.gather_kv_ref(kv_cache, meta.block_tables[i], seq_len, k_scale, v_scale,
                                           torch.float32)  # [L, Hkv, D]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        q_scale = q.abs().amax(-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX
        q8 = round_e4m3(q / q_scale) * q_scale if "q" in rounded else q
        s = torch.einsum("qhd,khd->hqk", q8, k) * scale
        q_pos = torch.arange(seq_len - q_len, seq_len).unsqueeze(1)
        k_pos = torch.arange(seq_len).unsqueeze(0)
        mask = k_pos <= q_pos
        if sliding_window is not None:
            mask &= k_pos > q_pos - sliding_window
        s = s.masked_fill(~mask, float("-inf"))
        p = torch.exp(s - s.amax(-1, keepdim=True))
        denom = p.sum(-1, keepdim=True)
        p8 = round_e4m3(p * p_scale) / p_scale if "p" in rounded else p
        o = torch.einsum("hqk,khd->qhd", p8, v) / denom.permute(1, 0, 2)
        out[starts[i] : starts[i + 1]] = o.to(query.dtype)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--p-scale", type=float, default=1.0)
    ap.add_argument("--rounded", default="qp", help="which operands to round: q, p or qp")
    ns = ap.parse_args()
    from meshserve import LLM
    from meshserve.bench.quant_accuracy import PROMPTS, agreement, greedy, load_text, score
    from meshserve.models.embedded import resolve_default_model

    model_dir = str(resolve_default_model())
    base = LLM(model_dir, dtype=ns.dtype)
    tok = base.get_tokenizer()
    ids = tok(load_text())["input_ids"]
    windows = [ids[i : i + ns.window] for i in range(0, len(ids) - 1, ns.window)]
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    base_lp, base_gen = score(base, windows), greedy(base, prompts, ns.max_tokens)
    del base
    print(f"| variant | perplexity ({len(base_lp)} tokens) | vs {ns.dtype} | mean abs Δ logprob | greedy agreement |")
    print("|---|---|---|---|---|")
    ref_ppl = math.exp(-sum(base_lp) / len(base_lp))
    print(f"| {ns.dtype} (reference) | {ref_ppl:.3f} | - | - | - |", flush=True)
    plain = attention_ref.paged_attention_ref
    for name, fn in (("fp8 KV cache", plain),
                     (f"fp8 KV + {' and '.join(ns.rounded.upper())} in e4m3 (P x {ns.p_scale:g})",
                      lambda *a, **kw: fp8_products_attention_ref(*a, **kw, p_scale=ns.p_scale,
                                                                  rounded=ns.rounded))):
        attention_ref.paged_attention_ref = fn  # the torch backend imports it at each call
        try:
            llm = LLM(model_dir, dtype=ns.dtype, kv_cache_dtype="fp8")
            lp, gen = score(llm, windows), greedy(llm, prompts, ns.max_tokens)
            del llm
        finally:
            attention_ref.paged_attention_ref = plain
        ppl = math.exp(-sum(lp) / len(lp))
        d = sum(abs(a - b) for a, b in zip(lp, base_lp)) / len(lp)
        print(f"| {name} | {ppl:.3f} | {ppl / ref_ppl - 1:+.2%} | {d:.4f} | {agreement(gen, base_gen) * 100:.1f}% |",
              flush=True)


if __name__ == "__main__":
    main()
