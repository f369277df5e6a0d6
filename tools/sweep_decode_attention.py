"""Sweep the Triton decode-attention kernel's tile and launch settings on the GPU; report effective bandwidth.

usage: python tools/sweep_decode_attention.py [--quick]

Shapes are the ones that matter for W1/W2 (Llama-3.1-8B: 8 KV heads, group 4; Qwen3-0.6B: group 2; head_dim
128). Bandwidth = K and V bytes read / kernel time; compare with the measured copy bandwidth printed first.
"""

import argparse
import functools
import itertools
import json

import torch
import triton.testing

from meshserve.kernels.triton_attention import _num_sms, decode_attention, decode_num_splits


def make_case(batch, ctx, kv_heads, group, head_dim=128, block_size=16, dtype=torch.bfloat16):
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    perm = torch.randperm(num_blocks - 1, device="cuda") + 1  # scattered blocks, like a busy pool
    tables = perm[: batch * blocks_per_seq].view(batch, blocks_per_seq).to(torch.int64)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int64, device="cuda")
    qsl = torch.arange(batch + 1, dtype=torch.int64, device="cuda")
    q = torch.randn(batch, kv_heads * group, head_dim, dtype=dtype, device="cuda")
    out = torch.empty_like(q)
    kv_bytes = 2 * batch * ctx * kv_heads * head_dim * cache.element_size()
    return q, cache, tables, seq_lens, qsl, out, kv_bytes


def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x))
    return 2 * x.numel() / (ms * 1e-3)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ns = ap.parse_args()
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    cases = [(256, 1024, 8, 4, 16), (256, 1024, 8, 2, 16), (64, 2048, 8, 4, 16), (16, 2048, 8, 4, 16),
             (1, 256, 8, 4, 16), (1, 256, 8, 2, 16), (256, 1024, 8, 4, 64)]
    block_ns = [32, 64] if ns.quick else [32, 64, 128]
    warps = [2, 4] if ns.quick else [2, 4, 8]
    stages = [1, 2, 3] if ns.quick else [1, 2, 3, 4]
    results = []
    for batch, ctx, kvh, group, bsz in cases:
        q, cache, tables, seq_lens, qsl, out, kv_bytes = make_case(batch, ctx, kvh, group, block_size=bsz)
        base_splits = decode_num_splits(batch, kvh, ctx, 64, _num_sms(0))
        rows = []
        for bn, nw, st, sp_mult in itertools.product(block_ns, warps, stages, (0.5, 1, 2)):
            splits = max(1, int(base_splits * sp_mult))
            if sp_mult != 1 and splits == base_splits:
                continue
            try:
                fn = functools.partial(decode_attention, q, cache, tables, seq_lens, qsl, 128**-0.5, None, out,
                                       splits, block_n=bn, num_warps=nw, num_stages=st)
                fn()
                ms = triton.testing.do_bench(fn, warmup=10, rep=40)
            except Exception as e:  # noqa: BLE001 - out of shared memory etc.: skip the setting
                print(f"  skip bn={bn} w={nw} s={st}: {type(e).__name__}")
                continue
            rows.append({"batch": batch, "ctx": ctx, "group": group, "block_size": bsz, "block_n": bn,
                         "warps": nw, "stages": st, "splits": splits, "us": ms * 1e3,
                         "tb_s": kv_bytes / (ms * 1e-3) / 1e12})
        rows.sort(key=lambda r: r["us"])
        default = [r for r in rows if r["block_n"] == 64 and r["warps"] == 4 and r["stages"] == 3
                   and r["splits"] == base_splits]
        print(f"\nbatch {batch} ctx {ctx} group {group} block_size {bsz} (heuristic splits {base_splits}); "
              f"current default: {default[0]['us']:.1f} us {default[0]['tb_s']:.2f} TB/s" if default else "")
        for r in rows[:6]:
            print(f"  bn={r['block_n']:3d} warps={r['warps']} stages={r['stages']} splits={r['splits']:2d}: "
                  f"{r['us']:8.1f} us  {r['tb_s']:.2f} TB/s ({r['tb_s'] * 1e12 / bw:.0%} of copy)")
        results += rows
    print("JSON " + json.dumps(results))


if __name__ == "__main__":
    main()
