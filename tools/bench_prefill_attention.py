"""Time the prompt tokens' attention of CUDA-graph mixed steps and of a long eager prefill, for every tiling
variant (meshserve/kernels/attention_tile_config.py), so the default can be picked from one device run.

usage: python tools/bench_prefill_attention.py [--json PATH] [--variants I,J,...] [--jobs N]

Cases (Llama-3.1-8B: 32 q heads, 8 KV heads, head dim 128, block size 16, bf16), all timed as CUDA-graph
replays (triton.testing.do_bench_cudagraph):
* issue 18's step: 1,014 prompt tokens in 1-4 fresh prompts beside 254 decode rows at context 700, in the
  (T 1,280, S 256) bucket: unified_attention(skip_single=True), the prompts' share of the graph-bound step;
* 2,000 prompt tokens (1 and 4 prompts) beside 48 decode rows in the (2,048, 256) bucket;
* one 8,192-token prompt through prefill_attention (the eager path; persistent does not apply there).
Per row: microseconds, causal TFLOP/s (4 * D * H * sum over prompts of n * prefix + n (n + 1) / 2), the max
abs difference from variant 0 (the launch before this branch), and for persistent variants the once-per-step
work-list build (us_work, not in us: the backend builds it once for all layers). A summary ranks the variants
per case. --jobs N first compiles the variants in N subprocesses (Triton's disk cache), which keeps one run of
all variants well under two minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace

import torch
import triton.testing

from meshserve.kernels.attention_tile_config import AttentionTileConfig, bench_variants, default_tile_config
from meshserve.kernels.triton_attention import prefill_attention
from meshserve.kernels.triton_unified_attention import unified_attention
from meshserve.kernels.triton_unified_persistent import build_unified_work

HEADS, KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
# name, prompt lengths, decode rows, decode context, bucket tokens T, sequence slots S
UNIFIED_CASES = [
    ("i18_1x1014", [1014], 254, 700, 1280, 256),
    # 2-4 prompts + 254 decode rows need more than 256 slots: the next multiple of 8
    ("i18_2x507", [507, 507], 254, 700, 1280, 264),
    ("i18_3x338", [338, 338, 338], 254, 700, 1280, 264),
    ("i18_4x254", [254, 254, 253, 253], 254, 700, 1280, 264),
    ("2k_1x2000", [2000], 48, 700, 2048, 256),
    ("2k_4x500", [500, 500, 500, 500], 48, 700, 2048, 256),
]
PREFILL_CASE = ("prefill_8192", [8192], 0, 0, 8192, 1)


def make_step(prompts, decodes, ctx, num_tokens, num_seqs, seed=0):
    """A padded graph-bound step: fresh prompts first, then decode rows; random block tables."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    q_lens = list(prompts) + [1] * decodes
    seq_lens = list(prompts) + [ctx] * decodes
    width = max(-(-s // BLOCK_SIZE) for s in seq_lens)
    num_blocks = sum(-(-s // BLOCK_SIZE) for s in seq_lens) + 1
    cache = torch.randn(2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM, device="cuda", generator=g).bfloat16()
    perm = torch.randperm(num_blocks, device="cuda", generator=g).int()
    tables = torch.zeros(num_seqs, width, dtype=torch.int32, device="cuda")
    k = 0
    for i, s in enumerate(seq_lens):
        n = -(-s // BLOCK_SIZE)
        tables[i, :n] = perm[k : k + n]
        k += n
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    qsl += [qsl[-1]] * (num_seqs - len(q_lens))
    query = torch.randn(num_tokens, HEADS, HEAD_DIM, device="cuda", generator=g).bfloat16()
    lens = torch.tensor(seq_lens + [0] * (num_seqs - len(seq_lens)), dtype=torch.int32, device="cuda")
    return query, cache, tables, lens, torch.tensor(qsl, dtype=torch.int32, device="cuda")


def causal_flops(prompts, prefix=0) -> float:
    return 4.0 * HEAD_DIM * HEADS * sum(n * prefix + n * (n + 1) / 2 for n in prompts)


def prefill_variants(variants: list[AttentionTileConfig]) -> list[AttentionTileConfig | None]:
    """The eager kernel's distinct tilings (persistent is the unified kernel's), after its own default (None)."""
    seen, out = set(), [None]
    for cfg in variants:
        cfg = replace(cfg, persistent=False, programs_per_sm=1)
        if cfg not in seen:
            seen.add(cfg)
            out.append(cfg)
    return out


def run_case(case, variants, rep, rows, warm_only):
    name, prompts, decodes, ctx, t, s = case
    query, cache, tables, lens, qsl = make_step(prompts, decodes, ctx, t, s)
    scale = HEAD_DIM**-0.5
    flops = causal_flops(prompts)
    real = sum(prompts)
    base = None
    for idx, cfg in variants:
        out = torch.zeros_like(query)
        us_work = None
        if case is PREFILL_CASE:

            def fn(cfg=cfg, out=out):
                prefill_attention(query, cache, tables, lens, qsl, t, scale, None, out, config=cfg)

            default = default_tile_config(128, 4, t, long_prefill=True)
            # (the grid/persist part of a name is the unified kernel's: the prefill kernel always runs its grid)
            label = "prefill_" + (cfg or default).name().split("_", 1)[1] + ("" if cfg else "_default")
        else:
            work = build_unified_work(qsl, lens, t, cfg.block_q, True) if cfg.persistent else None

            def fn(cfg=cfg, out=out, work=work):
                unified_attention(
                    query, cache, tables, lens, qsl, scale, None, out, skip_single=True, config=cfg, work=work
                )

            label = cfg.name()
            if cfg.persistent and not warm_only:

                def build(cfg=cfg):
                    build_unified_work(qsl, lens, t, cfg.block_q, True)

                us_work = round(triton.testing.do_bench_cudagraph(build, rep=rep) * 1e3, 2)
        fn()
        torch.cuda.synchronize()
        if warm_only:
            continue
        if base is None:
            base = out[:real].float().clone()
        us = triton.testing.do_bench_cudagraph(fn, rep=rep) * 1e3
        row = {
            "case": name,
            "variant": label,
            "index": idx,
            "us": round(us, 2),
            "tflops": round(flops / us / 1e6, 1),
            "max_diff_vs_first": round((out[:real].float() - base).abs().max().item(), 4),
            "us_work": us_work,
            "config": asdict(cfg) if cfg else None,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="bench_prefill_attention.json")
    ap.add_argument(
        "--variants", default=None, help="comma-separated indices into bench_variants (default: all)"
    )
    ap.add_argument(
        "--jobs", type=int, default=8, help="compile the variants in this many subprocesses first"
    )
    ap.add_argument("--rep", type=int, default=15, help="ms of replays per timing")
    ap.add_argument("--warm-only", action="store_true", help=argparse.SUPPRESS)
    ns = ap.parse_args()
    all_variants = list(enumerate(bench_variants(HEADS // KV_HEADS)))
    if ns.variants:
        keep = {int(i) for i in ns.variants.split(",")}
        all_variants = [(i, c) for i, c in all_variants if i in keep]
    t0 = time.perf_counter()
    if ns.jobs > 1 and not ns.warm_only:
        shards = [all_variants[k :: ns.jobs] for k in range(ns.jobs)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--warm-only",
                    "--jobs",
                    "1",
                    "--variants",
                    ",".join(str(i) for i, _ in shard),
                ],
                env=os.environ,
            )
            for shard in shards
            if shard
        ]
        for p in procs:
            p.wait()
        print(f"compiled {len(all_variants)} variants in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for case in UNIFIED_CASES:
        run_case(case, all_variants, ns.rep, rows, ns.warm_only)
    prefill = list(enumerate(prefill_variants([c for _, c in all_variants])))
    run_case(PREFILL_CASE, prefill, ns.rep, rows, ns.warm_only)
    if ns.warm_only:
        return
    summary = {}
    for case in [c[0] for c in UNIFIED_CASES] + [PREFILL_CASE[0]]:
        ranked = sorted((r for r in rows if r["case"] == case), key=lambda r: r["us"])
        summary[case] = [(r["variant"], r["us"], r["tflops"]) for r in ranked[:5]]
        best, first = ranked[0], next(r for r in rows if r["case"] == case)
        print(
            f"{case}: best {best['variant']} {best['us']} us {best['tflops']} TFLOP/s; first {first['us']} us"
        )
    with open(ns.json, "w") as f:
        gpu = torch.cuda.get_device_name()
        json.dump(
            {"gpu": gpu, "date": time.strftime("%Y-%m-%d"), "rows": rows, "summary": summary}, f, indent=1
        )
    print(f"wrote {ns.json} in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
