"""Batch-1 projection time of quantized weights (issue 20): every fp8 / int4 GEMV variant and a few tile shapes of
each beside the bf16 Triton GEMV, at Llama-3.1-8B's decoder shapes, inside CUDA graphs.

usage: python tools/bench_quant_gemv.py [--out results.json] [--quick] [--budget-s 80]

For each shape and kernel: time (triton.testing.do_bench_cudagraph), weight bytes read per call (scales and zero
points included) / time, that as % of the copy bandwidth measured on the spot, and the largest error against
the reference (quant_ref) relative to the output's largest magnitude. The summary sums the four projections
per kernel (one decoder layer; x 32 layers is the step's projection time) with its default tiles and with the
best tiles per shape, and names the winners. --quick runs the default tiles only. The sweep stops adding
kernels when --budget-s has passed (one run of the full sweep: ~60-80 s on an H200, most of it compiling).
--smoke runs tiny shapes through the Triton interpreter on the CPU (wall-clock timing: checks the harness, not
the speed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
SMOKE_SHAPES = {"a": (64, 256), "b": (32, 512)}
GROUP_SIZE = 128


def _fp8_tiles(quick: bool):
    """(label, tiles(n, k) or None for the variant's default) per fp8 variant."""
    from meshserve.kernels.gemv_tiles import GemvTiles

    default = [("default", None)]
    if quick:
        return {v: default for v in ("cvt", "half", "local", "words")}
    rows = [
        ("4x1024 w8 (first kernel)", lambda n, k: GemvTiles(4, 1024, num_warps=8)),
        ("8x1024 w2", lambda n, k: GemvTiles(8, 1024, num_warps=2)),
        ("8x2048 w4", lambda n, k: GemvTiles(8, 2048, num_warps=4)),
        ("16x512 w4", lambda n, k: GemvTiles(16, 512, num_warps=4)),
        ("32x256 w4", lambda n, k: GemvTiles(32, 256, num_warps=4)),
        ("16x512 w4 split2<8192", lambda n, k: GemvTiles(16, 512, split_k=2 if n < 8192 else 1)),
    ]
    words = [
        ("4x2048 w4", lambda n, k: GemvTiles(4, 2048, num_warps=4)),
        ("4x1024 w2", lambda n, k: GemvTiles(4, 1024, num_warps=2)),
        ("8x512 w1", lambda n, k: GemvTiles(8, 512, num_warps=1)),
        ("16x512 w2", lambda n, k: GemvTiles(16, 512, num_warps=2)),
        ("16x1024 w4", lambda n, k: GemvTiles(16, 1024, num_warps=4)),
        ("8x2048 w4", lambda n, k: GemvTiles(8, 2048, num_warps=4)),
        # o_proj and down streamed at 80-83% in one wave of programs (2026-12-04): two K ranges a row block, the
        # partials summed by split_k_reduce's launch
        ("16x1024 w4 split2", lambda n, k: GemvTiles(16, 1024, split_k=2, num_warps=4)),
        ("4x1024 w2 split2", lambda n, k: GemvTiles(4, 1024, split_k=2, num_warps=2)),
    ]
    return {
        "cvt": default + rows,
        "half": default + rows[1:3],
        "local": default + rows[1:2],
        "words": default + words,
    }


def _int4_tiles(quick: bool):
    """(label, tiles(n, k) or None for the default) of the int4 GEMV ('half', the kernel of group-uniform
    weights) and of its act-order paths ('grouped': the same weights with a permuted g_idx; 'perm': those
    act-order weights sorted by group as the layer loads them, the half kernel gathering x through perm)."""
    import triton

    from meshserve.kernels.gemv_tiles import GemvTiles

    def per_sm(block_n, block_k, warps, programs, min_steps=4, floor=False):
        # split-K for ~programs per SM, each >= min_steps steps (default_int4_tiles: 128x64 w1, 12, 2, floor); floor: at
        # most programs per SM (one wave: gate_up's 8 splits make 1,792 programs for 1,584 slots at 12 per SM)
        def tiles(n, k):
            blocks = triton.cdiv(n, block_n)
            want = programs * 132 // blocks if floor else triton.cdiv(programs * 132, blocks)
            split = max(1, min(want, k // (min_steps * block_k)))
            return GemvTiles(block_n, block_k, split_k=split, num_warps=warps, num_stages=1)

        return tiles

    default = [("default", None)]
    if quick:
        return {"half": default, "grouped": default, "perm": default}
    return {
        "half": default
        + [
            # the rule before 2026-12-04 (>= 12 per SM rounded up, >= 4 steps, the fused reduce loading 8 partials
            # at once): 53.6 us a layer against the default's 48.3 (gate_up in two waves; qkv / o ~4-6 per SM)
            ("half 128x64 w1 12/SM chunk8 (before)", per_sm(128, 64, 1, 12)),
            ("half 128x64 w1 12/SM >=2 one wave chunk8", per_sm(128, 64, 1, 12, min_steps=2, floor=True)),
            ("half 128x64 w1 12/SM >=1 one wave", per_sm(128, 64, 1, 12, min_steps=1, floor=True)),
            ("half 128x64 w1 10/SM >=2 one wave", per_sm(128, 64, 1, 10, min_steps=2, floor=True)),
            ("half 128x64 w1 8/SM", per_sm(128, 64, 1, 8)),
            ("half 128x64 w1 16/SM", per_sm(128, 64, 1, 16)),
            ("half 128x32 w1 16/SM (first)", per_sm(128, 32, 1, 16)),  # 96 registers
            ("half 256x64 w2 6/SM", per_sm(256, 64, 2, 6)),
        ],
        "grouped": default
        + [
            ("grouped 128x32 w1 16/SM", per_sm(128, 32, 1, 16)),
            ("grouped 256x32 w2 4/SM", per_sm(256, 32, 2, 4)),  # 217 registers
        ],
        "perm": default,  # the half kernel's tiles (168 registers at one row, like the plain kernel)
    }


class Bench:
    def __init__(self, device: str, budget_s: float):
        self.device = device
        self.start = time.time()
        self.budget_s = budget_s
        self.skipped = 0

    def over_budget(self) -> bool:
        return time.time() - self.start > self.budget_s

    def time_ms(self, fn) -> float:
        if self.device == "cuda":
            import triton.testing

            return triton.testing.do_bench_cudagraph(fn)
        fn()  # the interpreter: one warm call, then one timed
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3


def _copy_bandwidth(device: str) -> float:
    if device != "cuda":
        return 1e9
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / (triton.testing.do_bench(lambda: dst.copy_(src)) * 1e-3)
    return bw


def run(args) -> dict:
    from meshserve.kernels import quant_ops, triton_gemv
    from meshserve.kernels.quant_ref import (
        fp8_weight_only_ref,
        int4_dequant_ref,
        int4_group_order,
        pack_int4_rows,
        permute_int4_rows,
        quantize_fp8_per_channel,
        quantize_int4_groups,
    )
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv
    from meshserve.kernels.triton_int4_gemv import int4_gemv
    from meshserve.kernels.triton_quant import int4_matmul

    device = "cpu" if args.smoke else "cuda"
    dtype = torch.float16 if args.smoke else torch.bfloat16  # the interpreter rounds to bf16 unlike torch
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    group = 64 if args.smoke else GROUP_SIZE
    bench = Bench(device, args.budget_s)
    bw = _copy_bandwidth(device)
    rows: list[dict] = []
    fp8_tiles, int4_tiles = _fp8_tiles(args.quick), _int4_tiles(args.quick)

    def record(kind, variant, label, tiles, name, n, k, nbytes, fn, ref):
        if bench.over_budget():
            bench.skipped += 1
            return
        try:
            y = fn()
            err = ((y.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()
            ms = bench.time_ms(fn)
        except Exception as e:  # noqa: BLE001 - a tile that does not compile is reported, the sweep goes on
            print(f"  {kind} {variant} {label} {name}: {type(e).__name__}: {str(e)[:120]}")
            return
        row = {
            "kind": kind,
            "variant": variant,
            "tiles": label,
            "tiles_used": repr(tiles),
            "shape": name,
            "n": n,
            "k": k,
            "bytes": nbytes,
            "us": ms * 1e3,
            "GBps": nbytes / (ms * 1e-3) / 1e9,
            "pct_copy": 100 * nbytes / (ms * 1e-3) / bw,
            "max_rel_err": err,
            "ok": err < 2e-2,
        }
        rows.append(row)
        print(
            f"{kind:5s} {variant:9s} {label:26s} {name:8s} {row['us']:8.1f} us {row['GBps']:7.0f} GB/s "
            f"{row['pct_copy']:5.1f}%  err {err:.1e}{'' if row['ok'] else '  MISMATCH'}",
            flush=True,
        )

    data = {}
    for name, (n, k) in shapes.items():  # the operands of every shape, made once (~0.8 GB on the GPU)
        g = torch.Generator(device=device).manual_seed(n + k)
        w = torch.randn(n, k, device=device, generator=g, dtype=torch.float32) * 0.02
        x = torch.randn(1, k, device=device, generator=g, dtype=torch.float32).to(dtype)
        d = {"x": x, "w16": w.to(dtype)}
        d["ref16"] = x.float() @ d["w16"].float().t()
        d["wq"], d["ws"] = quantize_fp8_per_channel(w)
        d["ref8"] = fp8_weight_only_ref(x.float(), d["wq"], d["ws"])
        d["ref_sc"] = quant_ops.fp8_linear_ref(x.float(), d["wq"], d["ws"])
        q, scales, zeros = quantize_int4_groups(w, group)
        d["i4"] = (pack_int4_rows(q), scales.half(), zeros.half())
        d["ref4"] = x.float() @ int4_dequant_ref(*d["i4"], group, dtype=torch.float32)
        # act-order: the same packed weights under a permuted g_idx (GPTQ desc_act's layout: the grouped kernel)
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).to(device)
        d["g_idx"] = (torch.arange(k, device=device) // group)[perm].int()
        d["ref4g"] = x.float() @ int4_dequant_ref(*d["i4"], group, d["g_idx"], dtype=torch.float32)
        # the same act-order weights sorted by group at load (layers/quantization/int4.py): K rows reordered by
        # perm, no g_idx; the half kernel gathers x through perm (reference: ref4g, the unsorted weights')
        d["perm"] = int4_group_order(d["g_idx"], group, k // group)
        d["i4p"] = (permute_int4_rows(d["i4"][0], d["perm"]), *d["i4"][1:])
        data[name] = d
        del w, q

    def jobs(extra: bool):
        """(kind, variant, label, tiles(n, k) or None, call(d, tiles), reference key, bytes(n, k)) in the order
        they run: the defaults and baselines of every shape first, then the other tiles (what the budget cuts)."""
        b16, b8 = (lambda n, k: 2 * n * k), (lambda n, k: n * k + 4 * n)
        b4 = lambda n, k: n * k // 2 + 2 * 2 * (k // group) * n
        if not extra:
            yield (
                "bf16",
                "triton",
                "gemv",
                None,
                lambda d, t: triton_gemv.gemv(d["x"], d["w16"]),
                "ref16",
                b16,
            )
            if device == "cuda":
                yield (
                    "bf16",
                    "cublas",
                    "F.linear",
                    None,
                    lambda d, t: torch.nn.functional.linear(d["x"], d["w16"]),
                    "ref16",
                    b16,
                )
        for variant, tile_rows in fp8_tiles.items():
            for label, make in tile_rows[1:] if extra else tile_rows[:1]:
                yield (
                    "fp8",
                    variant,
                    label,
                    make,
                    lambda d, t, v=variant: fp8_gemv(d["x"], d["wq"], d["ws"], variant=v, tiles=t),
                    "ref8",
                    b8,
                )
        if (
            device == "cuda" and not extra
        ):  # the cuBLASLt path (x quantized per token first): vLLM's at batch 1
            yield (
                "fp8",
                "scaled_mm",
                "torch._scaled_mm",
                None,
                lambda d, t: quant_ops.fp8_linear(
                    d["x"], d["wq"], d["ws"], None, None, gemv=True, gemv_variant="scaled_mm"
                ),
                "ref_sc",
                b8,
            )
        for variant, tile_rows in int4_tiles.items():
            for label, make in tile_rows[1:] if extra else tile_rows[:1]:
                yield (
                    "int4",
                    variant,
                    label,
                    make,
                    lambda d, t, v=variant, lab=label: int4_gemv(
                        d["x"],
                        *(d["i4p"] if v == "perm" else d["i4"]),
                        group,
                        d["g_idx"] if v == "grouped" else None,
                        tiles=t,
                        reduce_chunk=8 if lab.endswith("chunk8") else 32,
                        perm=d["perm"] if v == "perm" else None,
                    ),
                    "ref4" if variant == "half" else "ref4g",
                    (lambda n, k: b4(n, k) + 4 * k) if variant == "perm" else b4,  # + the perm
                )
        if not extra:
            yield (
                "int4",
                "matmul",
                "dequant-GEMM (before)",
                None,
                lambda d, t: int4_matmul(d["x"], *d["i4"], group),
                "ref4",
                b4,
            )

    for extra in (False, True):
        for kind, variant, label, make, call, ref_key, nbytes in jobs(extra):
            for name, (n, k) in shapes.items():
                d, tiles = data[name], make(n, k) if make else None
                record(
                    kind,
                    variant,
                    label,
                    tiles,
                    name,
                    n,
                    k,
                    nbytes(n, k),
                    lambda c=call, d=d, t=tiles: c(d, t),
                    d[ref_key],
                )
    return {
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu (interpreter smoke run)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "copy_bandwidth_GBps": bw / 1e9,
        "shapes": {k: list(v) for k, v in shapes.items()},
        "results": rows,
        "summary": summarize(rows, list(shapes)),
        "skipped_over_budget": bench.skipped,
        "seconds": time.time() - bench.start,
    }


def summarize(rows: list[dict], shapes: list[str]) -> dict:
    """Per kernel (kind, variant): one decoder layer's four projections with its default tiles, and with the
    best correct tiles per shape (which tiles, too); the fastest fp8 and int4 of each, vs the bf16 GEMV."""
    out: dict = {}
    for kind, variant in sorted({(r["kind"], r["variant"]) for r in rows}):
        mine = [r for r in rows if (r["kind"], r["variant"]) == (kind, variant) and r["ok"]]
        best = {
            s: min((r for r in mine if r["shape"] == s), key=lambda r: r["us"], default=None) for s in shapes
        }
        default = {
            s: next(
                (
                    r
                    for r in mine
                    if r["shape"] == s
                    and r["tiles"]
                    in ("default", "gemv", "F.linear", "torch._scaled_mm", "dequant-GEMM (before)")
                ),
                None,
            )
            for s in shapes
        }
        entry = {"best_tiles": {s: r and r["tiles"] for s, r in best.items()}}
        if all(best.values()):
            entry["layer_us_best"] = sum(r["us"] for r in best.values())
        if all(default.values()):
            entry["layer_us_default"] = sum(r["us"] for r in default.values())
        out[f"{kind}/{variant}"] = entry
    bf16 = out.get("bf16/triton", {}).get("layer_us_best")
    for kind in ("fp8", "int4"):
        timed = {  # the act-order rows time other weights (a g_idx, or sorted with a perm): not candidates
            k: v["layer_us_best"]
            for k, v in out.items()
            if k.startswith(kind) and "layer_us_best" in v and k not in ("int4/grouped", "int4/perm")
        }
        if timed:
            win = min(timed, key=timed.get)
            out[f"winner_{kind}"] = {
                "kernel": win,
                "layer_us": timed[win],
                "speedup_vs_bf16_gemv": bf16 / timed[win] if bf16 else None,
            }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_quant_gemv.json", help="where the JSON results go")
    ap.add_argument("--quick", action="store_true", help="default tiles only")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes in the Triton interpreter on the CPU")
    ap.add_argument(
        "--budget-s", type=float, default=80.0, help="stop adding kernels after this many seconds"
    )
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        sys.exit("bench_quant_gemv: needs a CUDA device (or --smoke)")
    result = run(args)
    print(
        f"copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s; {result['seconds']:.0f} s"
        + (f"; {result['skipped_over_budget']} skipped over budget" if result["skipped_over_budget"] else "")
    )
    for key, entry in result["summary"].items():
        if key.startswith("winner_"):
            print(f"{key}: {entry}")
        else:
            print(
                f"{key:16s} layer default {entry.get('layer_us_default', float('nan')):8.1f} us  best "
                f"{entry.get('layer_us_best', float('nan')):8.1f} us  {entry['best_tiles']}"
            )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
