"""Sweep the Triton decode-attention kernel's tile and launch settings on the GPU; report effective bandwidth.

usage: python tools/sweep_decode_attention.py [--quick | --splits | --fp8-ab] [--kv-dtype fp8]

Shapes are the ones that matter for W1/W2 (Llama-3.1-8B: 8 KV heads, group 4; Qwen3-0.6B: group 2; head_dim
128). Bandwidth = K and V bytes read / kernel time; compare with the measured copy bandwidth printed first.

--splits: the default tile at 1, 2, 4 and 8 KV splits (each launch replayed from a CUDA graph, as the engine
runs it) over W2's batches and contexts (Qwen3-0.6B's group 2 and the 8B's 4), beside the split count
decode_num_splits picks: the data for its rule (at batch 16 and context ~1,500 its one split read KV at 3.0
TB/s, 70% of copy, in a W2 step on an H200, 2026-12-02).

--fp8-ab: the fp8 cache's decode tile paths side by side (MESHSERVE_DECODE_FP8_PATH: convert, today's, and
words, kernels/triton_e4m3_words.py) at one split over the three shapes measured on 2026-12-03 (batch 256 ctx
1,024 group 2; 64 / 2,048 / 4; 16 / 2,048 / 4) and seven tiles, beside the bf16 cache's default tile; each
words row also gives its largest difference from convert's output at the same tile (the same values and
products: expected 0 or a last-bit difference from the dot's operand order).

--kv-dtype fp8: the cache in e4m3 (scales 1.0), bandwidth over its bytes (half of bf16's): W2 Qwen3-0.6B with
an fp8 cache ran 6.28 s against ~5.8-6.0 s in bf16 (BENCHMARKS.md), as if the halved KV bytes bought nothing.
"""

import argparse
import functools
import itertools
import json

import torch
import triton.testing

from meshserve.engine.cuda_graph import captured_us
from meshserve.kernels.triton_attention import _num_sms, decode_attention, decode_num_splits


def make_case(batch, ctx, kv_heads, group, head_dim=128, block_size=16, dtype=torch.bfloat16, kv_dtype=None):
    blocks_per_seq = -(-ctx // block_size)
    num_blocks = batch * blocks_per_seq + 1
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device="cuda")
    if kv_dtype is not None:
        cache = cache.to(kv_dtype)
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


def sweep_splits(bw: float, kv_dtype=None) -> list[dict]:
    """The default tile at each split count for W2's shapes: one line per (group, batch, context)."""
    results = []
    print(f"{'group':>5} {'batch':>5} {'ctx':>5} {'rule':>4} " + " ".join(f"{f'{s} split us (TB/s)':>20}"
                                                                      for s in (1, 2, 4, 8)) + "  best")
    for group, batch, ctx in itertools.product((2, 4), (8, 16, 24, 32, 48, 64, 96, 128, 192, 256), (600, 1500)):
        q, cache, tables, seq_lens, qsl, out, kv_bytes = make_case(batch, ctx, 8, group, kv_dtype=kv_dtype)
        rule = decode_num_splits(batch, 8, ctx, 64, _num_sms(0))
        cells, times = [], {}
        for splits in (1, 2, 4, 8):
            fn = functools.partial(decode_attention, q, cache, tables, seq_lens, qsl, 128**-0.5, None, out, splits)
            # from a CUDA graph, as the engine runs it: timed eagerly, a split launch's workspace allocations and
            # reduce launch from Python took 70-107 us at batch 8 against 21-48 us for one split (H200,
            # 2026-12-03): the host's time
            times[splits] = captured_us(fn)
            cells.append(f"{times[splits]:8.1f} ({kv_bytes / times[splits] / 1e6:4.2f})")
            results.append({"group": group, "batch": batch, "ctx": ctx, "splits": splits, "rule": rule,
                            "us": times[splits], "tb_s": kv_bytes / times[splits] / 1e6})
        best = min(times, key=times.get)
        print(f"{group:>5} {batch:>5} {ctx:>5} {rule:>4} " + " ".join(f"{c:>20}" for c in cells)
              + f"  {best} ({times[rule] / times[best]:.2f}x the rule's time)")
        del q, cache
    print(f"(copy bandwidth {bw / 1e12:.2f} TB/s)")
    return results


FP8_AB_SHAPES = ((256, 1024, 2), (64, 2048, 4), (16, 2048, 4))  # batch, context, group (8 KV heads, head_dim 128)
FP8_AB_TILES = ((128, 4, 3), (64, 2, 2), (128, 4, 2), (64, 4, 2), (128, 8, 3), (32, 2, 2), (128, 4, 1))  # block_n, warps, stages


def sweep_fp8_paths(bw: float) -> list[dict]:
    """convert vs words over an fp8 cache at one split, every tile of FP8_AB_TILES, beside bf16's default."""
    results = []
    for batch, ctx, group in FP8_AB_SHAPES:
        print(f"\nbatch {batch} ctx {ctx} group {group}, one split (copy bandwidth {bw / 1e12:.2f} TB/s)")
        q, cache, tables, seq_lens, qsl, out, kv_bytes = make_case(batch, ctx, 8, group)
        fn = functools.partial(decode_attention, q, cache, tables, seq_lens, qsl, 128**-0.5, None, out, 1)
        fn()
        us = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
        print(f"  bf16 cache, default tile          {us:8.1f} us  {kv_bytes / us / 1e6:4.2f} TB/s")
        results.append({"batch": batch, "ctx": ctx, "group": group, "cache": "bf16", "us": us,
                        "tb_s": kv_bytes / us / 1e6})
        cache8 = cache.to(torch.float8_e4m3fn)
        del cache
        kv_bytes //= 2
        for bn, nw, st in FP8_AB_TILES:
            outs = {}
            for path in ("convert", "words"):
                o = torch.empty_like(out)
                fn = functools.partial(decode_attention, q, cache8, tables, seq_lens, qsl, 128**-0.5, None, o, 1,
                                       block_n=bn, num_warps=nw, num_stages=st, fp8_path=path)
                fn()
                us = triton.testing.do_bench(fn, warmup=10, rep=50) * 1e3
                outs[path] = o
                diff = (o.float() - outs["convert"].float()).abs().max().item()
                print(f"  fp8 {path:8s} bn={bn:3d} w={nw} s={st}  {us:8.1f} us  {kv_bytes / us / 1e6:4.2f} TB/s"
                      + (f"  max |words - convert| {diff:.3g}" if path == "words" else ""))
                results.append({"batch": batch, "ctx": ctx, "group": group, "cache": "fp8", "path": path,
                                "block_n": bn, "warps": nw, "stages": st, "us": us, "tb_s": kv_bytes / us / 1e6,
                                "max_diff_vs_convert": diff})
        del q, cache8
    return results


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--splits", action="store_true", help="split counts over W2's shapes, the default tile")
    ap.add_argument("--kv-dtype", choices=["bf16", "fp8"], default="bf16", help="the cache's dtype (fp8: e4m3)")
    ap.add_argument("--fp8-ab", action="store_true", help="fp8 tile paths convert vs words (and bf16) at 1 split")
    ns = ap.parse_args()
    kv_dtype = torch.float8_e4m3fn if ns.kv_dtype == "fp8" else None
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; cache {ns.kv_dtype}")
    if ns.fp8_ab:
        print("JSON " + json.dumps(sweep_fp8_paths(bw)))
        return
    if ns.splits:
        print("JSON " + json.dumps(sweep_splits(bw, kv_dtype)))
        return
    cases = [(256, 1024, 8, 4, 16), (256, 1024, 8, 2, 16), (64, 2048, 8, 4, 16), (16, 2048, 8, 4, 16),
             (1, 256, 8, 4, 16), (1, 256, 8, 2, 16), (256, 1024, 8, 4, 64)]
    block_ns = [32, 64] if ns.quick else [32, 64, 128]
    warps = [2, 4] if ns.quick else [2, 4, 8]
    stages = [1, 2, 3] if ns.quick else [1, 2, 3, 4]
    results = []
    for batch, ctx, kvh, group, bsz in cases:
        q, cache, tables, seq_lens, qsl, out, kv_bytes = make_case(batch, ctx, kvh, group, block_size=bsz,
                                                                    kv_dtype=kv_dtype)
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
