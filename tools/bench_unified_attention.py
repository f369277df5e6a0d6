"""Time the attention of one CUDA-graph-bound mixed step on the GPU: unified_attention (grid cdiv(T, BLOCK_Q) + S
per KV head) vs prefill_attention launched capture-safe (max_query_len = T: S x cdiv(T, BLOCK_Q) programs,
MixedStepGraphs' first version) vs prefill_attention with the step's true max_query_len (not valid for other
batches of the bucket: the lower bound a per-step grid would give).

usage: python tools/bench_unified_attention.py [--block-q N ...]

Each batch is the issue-18 shape: one (T, S) bucket holding decodes over contexts up to 2k plus a few prefill
chunks (e.g. 276 tokens / 53 sequences in the T=512, S=64 bucket). Times are CUDA-graph replays (do_bench_cudagraph)
so launch overhead is what a captured step pays. Prints one JSON line per (case, variant).
"""

import argparse
import json
import random

import torch
import triton.testing

from meshserve.kernels.triton_attention import prefill_attention
from meshserve.kernels.triton_unified_attention import unified_attention, unified_block_q

# (T, S, real sequences, prefill chunks, real tokens, max context)
CASES = [
    (512, 64, 53, 1, 276, 2048),
    (512, 256, 200, 2, 480, 2048),
    (2048, 256, 128, 4, 2000, 4096),
    (128, 64, 60, 1, 100, 2048),
]


def make_batch(
    t, s, num_real, num_chunks, real_tokens, max_ctx, kv_heads, group, head_dim, block_size=16, dev="cuda"
):
    rnd = random.Random(t * 1000 + s)
    decodes = num_real - num_chunks
    chunk_tokens = real_tokens - decodes
    chunks = [chunk_tokens // num_chunks] * num_chunks
    chunks[-1] += chunk_tokens - sum(chunks)
    q_lens = [1] * decodes + chunks
    seq_lens = [rnd.randint(q, max_ctx) if q == 1 else min(max_ctx, q + rnd.randint(0, 1024)) for q in q_lens]
    width = -(-max_ctx // block_size)
    num_blocks = s * width + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=torch.bfloat16, device=dev)
    tables = torch.zeros(s, width, dtype=torch.int32, device=dev)
    tables[:num_real] = (
        (torch.randperm(num_blocks - 1, device=dev)[: num_real * width] + 1).view(num_real, width).int()
    )
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    qsl += [qsl[-1]] * (s - num_real)
    qsl_t = torch.tensor(qsl, dtype=torch.int32, device=dev)
    lens_t = torch.tensor(seq_lens + [0] * (s - num_real), dtype=torch.int32, device=dev)
    q = torch.randn(t, kv_heads * group, head_dim, dtype=torch.bfloat16, device=dev)
    return q, cache, tables, lens_t, qsl_t, max(q_lens)


def bench_case(case, kvh, group, d, extra_block_q):
    """One JSON line per variant: microseconds per CUDA-graph replay."""
    t, s, num_real, num_chunks, real_tokens, max_ctx = case
    q, cache, tables, lens, qsl, max_q = make_batch(
        t, s, num_real, num_chunks, real_tokens, max_ctx, kvh, group, d
    )
    out = torch.empty_like(q)
    scale = d**-0.5
    variants = {
        "prefill_graph_maxq=T": lambda: prefill_attention(q, cache, tables, lens, qsl, t, scale, None, out),
        "prefill_true_maxq(not_graph_safe)": lambda: prefill_attention(
            q, cache, tables, lens, qsl, max_q, scale, None, out
        ),
    }
    for bq in [None, *extra_block_q]:
        name = f"unified_bq={bq or unified_block_q(d, group)}"
        variants[name] = lambda bq=bq: unified_attention(
            q, cache, tables, lens, qsl, scale, None, out, block_q=bq
        )
    for name, fn in variants.items():
        fn()
        torch.cuda.synchronize()
        ms = triton.testing.do_bench_cudagraph(fn)
        row = {
            "T": t,
            "S": s,
            "seqs": num_real,
            "tokens": real_tokens,
            "variant": name,
            "us": round(ms * 1e3, 1),
        }
        print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--block-q", type=int, nargs="*", default=[], help="extra unified BLOCK_Q values to try")
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ns = ap.parse_args()
    for case in CASES:
        bench_case(case, ns.kv_heads, ns.group, ns.head_dim, ns.block_q)


if __name__ == "__main__":
    main()
