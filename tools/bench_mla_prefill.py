"""Time MLA prefill steps at DeepSeek-V2-Lite's attention shapes (16 heads, R 512, N 128, P 64, V 128; one layer,
bf16, one GPU): the per-sequence reference (kernels/mla_ref.mla_prefill_ref, what every prefill step ran before)
against the batched path (kernels/mla_prefill.py: gather + kv_b_proj GEMM + the Triton varlen kernel), with the
batched path's parts and the kernel's TFLOP/s; and a mixed step through the whole MLAAttention layer with the
batched path on and off (MESHSERVE_MLA_PREFILL_REF's switch). Each result is checked against the reference.

The long-prefix cases run the batched path through the engine's workspace (max(max_num_batched_tokens, 8k)
-token chunks, kernels/mla_prefill_workspace.py) and report its size, the chunk count and the peak memory
of the step beside the unchunked expansion's.

usage: python tools/bench_mla_prefill.py [--sweep] [--json PATH] [--chunk-tokens N]

--sweep also times the kernel's tile configs (BLOCK_Q, BLOCK_N, warps, stages) on each case.
--chunk-tokens sets the workspace's chunk (default workspace_chunk_tokens(8192) = 8192).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import random
import sys

import torch
from triton.runtime.errors import OutOfResources

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.mla_prefill import chunk_plan, gather_expand, mla_prefill, prefill_context
from meshserve.kernels.mla_prefill_workspace import (
    MLAPrefillWorkspace,
    WorkspaceShape,
    workspace_chunk_tokens,
)
from meshserve.kernels.mla_ref import mla_prefill_ref
from meshserve.kernels.triton_mla_prefill import mla_prefill_attention, prefill_config
from meshserve.layers.backend_selection import KernelSelection
from meshserve.layers.mla_attention import MLAAttention

HEADS, NOPE, ROPE, V_DIM, RANK, BLOCK_SIZE = 16, 128, 64, 128, 512, 16
SCALE = (NOPE + ROPE) ** -0.5
DEV, DTYPE = "cuda", torch.bfloat16


def w2_first_step(budget: int = 8192) -> tuple[list[int], list[int]]:
    """W2's prompts (random.seed(0), 100-1024 ids) packed into one step of max_num_batched_tokens, the last
    one cut to a chunk: the shape of W2's first prefill steps."""
    random.seed(0)
    lens = [random.randint(100, 1024) for _ in range(256)]
    q, total = [], 0
    for n in lens:
        q.append(min(n, budget - total))
        total += q[-1]
        if total == budget:
            break
    return q, list(q)


CASES = {  # name: (q_lens, seq_lens)
    "w2_first_step_8k": w2_first_step(),
    "8x1024_from_scratch": ([1024] * 8, [1024] * 8),
    "4x2048_over_2048_prefix": ([2048] * 4, [4096] * 4),
    "8x512_over_3584_prefix": ([512] * 8, [4096] * 8),
    "mixed_2x1024_plus_128_decodes_ctx600": ([1024, 1024] + [1] * 128, [1024, 3000] + [600] * 128),
    "2x512_over_16k_prefix": ([512, 512], [16896, 16896]),
    "1x2048_over_32k_prefix": ([2048], [34816]),
    "verify_8x4_over_16k_plus_1x1024": ([4] * 8 + [1024], [16384] * 8 + [1024]),
}
STEP_TOKENS = 8192  # max_num_batched_tokens the workspace is sized for


def make_step(q_lens: list[int], seq_lens: list[int]):
    """Metadata, a latent cache holding every context (shuffled blocks), queries and kv_b_proj's weight."""
    g = torch.Generator().manual_seed(0)
    blocks_per = [-(-s // BLOCK_SIZE) for s in seq_lens]
    perm = torch.randperm(sum(blocks_per) + 8, generator=g).tolist()
    tables, slots, used = [], [], 0
    for q, s, n in zip(q_lens, seq_lens, blocks_per):
        tables.append(perm[used : used + n] + [0] * (max(blocks_per) - n))
        slots += [tables[-1][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(s - q, s)]
        used += n
    starts = list(itertools.accumulate(q_lens, initial=0))
    t = lambda x: torch.tensor(x, dtype=torch.int64, device=DEV)
    meta = AttentionMetadata(
        slot_mapping=t(slots),
        query_start_loc=t(starts),
        seq_lens=t(seq_lens),
        block_tables=t(tables),
        max_query_len=max(q_lens),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=starts,
        seq_lens_cpu=list(seq_lens),
    )
    rnd = lambda *shape: torch.randn(*shape, device=DEV, dtype=DTYPE)
    cache = rnd(1, len(perm), BLOCK_SIZE, 1, RANK + ROPE)
    tokens = starts[-1]
    q = rnd(tokens, HEADS, NOPE + ROPE)  # the model's q: q_nope is a strided view of it
    q_nope, q_pe = q.split([NOPE, ROPE], dim=-1)
    kv_b = rnd(HEADS * (NOPE + V_DIM), RANK) * RANK**-0.5
    return meta, cache, q_nope, q_pe.contiguous(), kv_b


def gpu_ms(fn, iters: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention_flops(q_lens, seq_lens) -> float:
    """Causal matmul FLOPs of the prefill chunks: QK^T (N + P) and PV (V) per visible (query, key) pair."""
    pairs = sum(q * (s - q) + q * (q + 1) / 2 for q, s in zip(q_lens, seq_lens) if q > 1)
    return 2 * pairs * HEADS * (NOPE + ROPE + V_DIM)


def fresh(meta: AttentionMetadata) -> AttentionMetadata:
    return dataclasses.replace(
        meta
    )  # an empty step memo: the step's context is built again, as in a real step


def peak_bytes(fn) -> int:
    """Memory the call allocates above what is allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def chunked_columns(meta, cache, q_nope, q_pe, kv_b, out, ref, prefill_rows, workspace) -> dict:
    """The batched path through the workspace: its size, the chunk count, time, error and peak step memory
    against the unchunked expansion's."""
    run = lambda ws: mla_prefill(q_nope, q_pe, cache, kv_b, fresh(meta), SCALE, out, True, workspace=ws)
    ctx = prefill_context(meta, BLOCK_SIZE)
    row = {
        "workspace_mib": workspace.nbytes / 2**20,
        "chunk_tokens": workspace.chunk_tokens,
        "chunks": chunk_plan(meta, ctx, workspace.chunk_tokens).num_chunks,
        "expanded_context_mib": ctx.num_tokens * HEADS * (NOPE + V_DIM) * 2 / 2**20,
    }
    run(workspace)
    row["chunked_max_abs_err"] = (out[prefill_rows] - ref[prefill_rows]).abs().max().item()
    row["chunked_ms"] = gpu_ms(lambda: run(workspace))
    row["chunked_step_peak_mib"] = peak_bytes(lambda: run(workspace)) / 2**20
    row["unchunked_step_peak_mib"] = peak_bytes(lambda: run(None)) / 2**20
    return row


@torch.inference_mode()
def bench_case(name: str, q_lens, seq_lens, sweep: bool, workspace: MLAPrefillWorkspace) -> dict:
    meta, cache, q_nope, q_pe, kv_b = make_step(q_lens, seq_lens)
    prefill_rows = torch.tensor(
        [
            r
            for i, q in enumerate(q_lens)
            if q > 1
            for r in range(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
        ],
        device=DEV,
    )
    out = torch.zeros(q_nope.shape[0], HEADS, V_DIM, device=DEV, dtype=DTYPE)
    row = {
        "case": name,
        "prefill_tokens": sum(q for q in q_lens if q > 1),
        "decode_rows": q_lens.count(1),
        "context_tokens": sum(s for q, s in zip(q_lens, seq_lens) if q > 1),
    }
    decode = q_lens.count(1) > 0
    verify = any(1 < q <= 8 for q in q_lens)  # the layer serves those rows absorbed: only the layer rows
    if not decode and not verify:  # the reference as the layer ran it on prefill-only steps
        ref = mla_prefill_ref(q_nope, q_pe, cache, kv_b, meta, SCALE)
        row["ref_ms"] = gpu_ms(lambda: mla_prefill_ref(q_nope, q_pe, cache, kv_b, meta, SCALE))
        mla_prefill(q_nope, q_pe, cache, kv_b, fresh(meta), SCALE, out, triton=True)
        row["max_abs_err"] = (out[prefill_rows] - ref[prefill_rows]).abs().max().item()
        row["batched_ms"] = gpu_ms(
            lambda: mla_prefill(q_nope, q_pe, cache, kv_b, fresh(meta), SCALE, out, True)
        )
        ctx = prefill_context(meta, BLOCK_SIZE)
        row["context_build_ms"] = gpu_ms(lambda: prefill_context(fresh(meta), BLOCK_SIZE))
        row["gather_expand_ms"] = gpu_ms(lambda: gather_expand(cache, kv_b, ctx, HEADS, DTYPE))
        kv, k_pe = gather_expand(cache, kv_b, ctx, HEADS, DTYPE)

        def kernel(**cfg):
            return mla_prefill_attention(
                q_nope,
                q_pe,
                kv,
                k_pe,
                ctx.start_loc,
                meta.seq_lens,
                meta.query_start_loc,
                meta.max_query_len,
                SCALE,
                out,
                **cfg,
            )

        row["kernel_ms"] = gpu_ms(kernel)
        row["kernel_tflops"] = attention_flops(q_lens, seq_lens) / row["kernel_ms"] / 1e9
        row["kernel_config"] = prefill_config(meta.max_query_len, 2)
        row["speedup"] = row["ref_ms"] / row["batched_ms"]
        row.update(chunked_columns(meta, cache, q_nope, q_pe, kv_b, out, ref, prefill_rows, workspace))
        if sweep:
            row["sweep"] = sweep_kernel(kernel, q_lens, seq_lens)
    # the whole layer (absorbed decode rows + prefill), batched path on vs off
    layer = MLAAttention(HEADS, NOPE, ROPE, V_DIM, RANK, SCALE).to(DEV)
    kv_c = torch.randn(q_nope.shape[0], RANK, device=DEV, dtype=DTYPE)
    k_pe_new = torch.randn(q_nope.shape[0], ROPE, device=DEV, dtype=DTYPE)
    results = {}
    for label, ref_switch in (("layer_ref_ms", True), ("layer_batched_ms", False)):
        layer.kernels = KernelSelection(attention_backend="triton", mla_prefill_ref=ref_switch)
        layer.prefill_workspace = None if ref_switch else workspace  # as bind_prefill_workspace binds it
        layer.kv_cache = cache.clone()
        results[label] = layer(q_nope, q_pe, kv_c, k_pe_new, kv_b, meta).float()
        # the step's split and context are built once per step (the first layer) and shared by the other 26
        row[label] = gpu_ms(lambda: layer(q_nope, q_pe, kv_c, k_pe_new, kv_b, meta))
    row["layer_max_abs_err"] = (results["layer_ref_ms"] - results["layer_batched_ms"]).abs().max().item()
    row["layer_speedup"] = row["layer_ref_ms"] / row["layer_batched_ms"]
    return row


def sweep_kernel(kernel, q_lens, seq_lens) -> list[dict]:
    rows = []
    for config in itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3, 4)):
        knobs = dict(zip(("block_q", "block_n", "num_warps", "num_stages"), config))
        try:
            ms = gpu_ms(lambda knobs=knobs: kernel(**knobs), iters=5)
        except (OutOfResources, RuntimeError) as e:  # out of shared memory / registers: skip the config
            rows.append({"config": config, "error": type(e).__name__})
            continue
        rows.append({"config": config, "ms": ms, "tflops": attention_flops(q_lens, seq_lens) / ms / 1e9})
    ok = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
    for r in ok[:5]:
        print(f"    sweep {r['config']}: {r['ms']:.3f} ms, {r['tflops']:.0f} TFLOP/s")
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sweep", action="store_true", help="also time the kernel's tile configs on each case")
    p.add_argument("--json", dest="out_path", metavar="PATH", help="write the rows here")
    p.add_argument("--chunk-tokens", type=int, metavar="N", help="the workspace's chunk (default 8192)")
    ns = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_mla_prefill: needs a CUDA GPU (it times Triton kernels)")
    sweep, out_path, chunk = ns.sweep, ns.out_path, ns.chunk_tokens
    shape = WorkspaceShape(chunk or workspace_chunk_tokens(STEP_TOKENS), STEP_TOKENS, HEADS, NOPE, ROPE, V_DIM,
                           RANK, DTYPE)  # fmt: skip
    workspace = MLAPrefillWorkspace(shape, DEV)
    print(f"workspace: {shape.chunk_tokens}-token chunks, {workspace.nbytes / 2**20:.1f} MiB")
    rows = []
    print(
        f"{torch.cuda.get_device_name()}; one MLA layer at DeepSeek-V2-Lite shapes, bf16, block_size {BLOCK_SIZE}"
    )
    for name, (q_lens, seq_lens) in CASES.items():
        row = bench_case(name, q_lens, seq_lens, sweep, workspace)
        rows.append(row)
        print(
            json.dumps(
                {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items() if k != "sweep"}
            )
        )
    if out_path:
        with open(out_path, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
