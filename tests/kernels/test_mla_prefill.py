"""Batched MLA prefill (kernels/mla_prefill.py, kernels/triton_mla_prefill.py) equals the per-sequence reference
mla_prefill_ref on mixed steps: prefill chunks over cached prefixes and from scratch beside decode rows, block
sizes 1 and 16, fp32 and bf16, the whole context at once and cut into workspace chunks (tiny ones here: a
context of several chunks, chunks not aligned to blocks, sequences split across chunks). On CPU the torch arm
and the Triton kernels in the interpreter; on the GPU (`-m gpu`) the compiled kernels at DeepSeek-V2-Lite's
shapes (16 heads, R 512, N 128, P 64, V 128), with a 16k-token prefix through a small workspace.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

from meshserve.kernels.mla_prefill import chunk_plan, gather_expand, mla_prefill, prefill_context
from meshserve.kernels.mla_prefill_workspace import MLAPrefillWorkspace, WorkspaceShape
from meshserve.kernels.mla_ref import gather_latent_ref, mla_prefill_ref, write_latent_ref
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90
from tests.kernels.test_mla import _problem

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# decode rows (q_len 1) between chunks: one from scratch (7 of 7), one over a 25-token prefix, a short one
Q_LENS, SEQ_LENS = [1, 7, 1, 20, 3], [9, 7, 30, 45, 3]
SENTINEL = 7.0


def _case(q_lens, seq_lens, block_size, dtype, device="cpu", heads=4, nope=16, rope=8, v_dim=24, rank=32):
    meta, cache, q_nope, q_pe, kv_c, k_pe, kv_b = _problem(
        heads, nope, rope, v_dim, rank, q_lens, seq_lens, block_size, dtype, device
    )
    write_latent_ref(kv_c, k_pe, cache, meta.slot_mapping)
    scale = (nope + rope) ** -0.5
    ref = mla_prefill_ref(q_nope.float(), q_pe.float(), cache.float(), kv_b.float(), meta, scale)
    prefill_rows = [
        r
        for i in range(len(q_lens))
        if q_lens[i] > 1
        for r in range(meta.query_start_loc_cpu[i], meta.query_start_loc_cpu[i + 1])
    ]
    return meta, cache, q_nope, q_pe, kv_b, scale, ref, prefill_rows


def _workspace(chunk_tokens, q_nope, kv_b, v_dim, max_query_tokens=None):
    heads, nope, rank = q_nope.shape[1], q_nope.shape[2], kv_b.shape[1]
    rope = 8 if nope == 16 else 64
    shape = WorkspaceShape(chunk_tokens, max_query_tokens or q_nope.shape[0], heads, nope, rope, v_dim, rank,
                           q_nope.dtype)  # fmt: skip
    return MLAPrefillWorkspace(shape, q_nope.device)


def _check(q_lens, seq_lens, block_size, dtype, triton, device="cpu", atol=None, chunk_tokens=None, **shape):
    meta, cache, q_nope, q_pe, kv_b, scale, ref, rows = _case(
        q_lens, seq_lens, block_size, dtype, device, **shape
    )
    out = torch.full((q_nope.shape[0], q_nope.shape[1], ref.shape[2]), SENTINEL, dtype=dtype, device=device)
    ws = _workspace(chunk_tokens, q_nope, kv_b, ref.shape[2]) if chunk_tokens else None
    mla_prefill(q_nope, q_pe, cache, kv_b, meta, scale, out, triton=triton, workspace=ws)
    tol = atol or (2e-2 if dtype == torch.bfloat16 else 1e-5)
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=tol, rtol=tol)
    decode_rows = [r for r in range(out.shape[0]) if r not in rows]
    assert bool((out[decode_rows] == SENTINEL).all()), "decode rows are the absorbed path's: left untouched"
    return out


@pytest.mark.parametrize("block_size", [1, 16])
def test_prefill_context_gathers_each_chunks_whole_context(block_size):
    meta, cache, *_ = _case(Q_LENS, SEQ_LENS, block_size, torch.float32)
    ctx = prefill_context(meta, block_size)
    assert ctx.start_loc_cpu == [0, 0, 7, 7, 52, 55] and ctx.start_loc.tolist() == ctx.start_loc_cpu
    assert prefill_context(meta, block_size) is ctx  # once per step: every layer shares it
    kv_b = torch.randn(4 * (16 + 24), 32)
    kv, k_pe = gather_expand(cache, kv_b, ctx, 4, torch.float32)
    expected = torch.cat([gather_latent_ref(cache, meta.block_tables[i], SEQ_LENS[i]) for i in (1, 3, 4)])
    assert torch.equal(k_pe, expected[:, 32:])
    torch.testing.assert_close(kv, (expected[:, :32] @ kv_b.T).view(-1, 4, 40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_torch_arm_equals_reference(block_size, dtype):
    _check(Q_LENS, SEQ_LENS, block_size, dtype, triton=False)


# a context of 7 + 75 + 3 = 85 rows: the 20-token chunk over a 55-token prefix spans several chunks and its
# new tokens straddle a chunk boundary (queries before a chunk's rows: lse -inf there)
CHUNK_Q_LENS, CHUNK_SEQ_LENS = [1, 7, 1, 20, 3], [9, 7, 30, 75, 3]


def test_chunk_plan_places_each_sequence_in_each_chunk():
    from tests.kernels.test_mla import _meta

    # sequence 1: 10 rows (4 cached + 6 new), sequence 2: 4 new rows; chunks of 8 rows
    meta = _meta([1, 6, 4], [5, 10, 4], block_size=4, num_blocks=8)
    ctx = prefill_context(meta, 4)
    plan = chunk_plan(meta, ctx, 8)
    assert plan.num_chunks == 2 and plan.rows(0) == (0, 8) and plan.rows(1) == (8, 14)
    assert plan.ctx_len_cpu == [[0, 8, 0], [0, 2, 4]]  # sequence 0 (one token) holds no rows
    assert plan.ctx_loc_cpu[1][1:] == [0, 2]
    # query 0 of sequence 1 (position 4) is row 4 of chunk 0 and lies 4 rows before chunk 1's first row
    # (where a sequence holds no rows its q_off is never read)
    assert plan.q_off_cpu[0][1] == 4 and plan.q_off_cpu[1][1:] == [-4, 0]
    for host, dev in ((plan.ctx_loc_cpu, plan.ctx_loc), (plan.ctx_len_cpu, plan.ctx_len)):
        assert dev[:, 1:].tolist() == [row[1:] for row in host]
    assert plan.q_off[:, 1:].tolist() == [row[1:] for row in plan.q_off_cpu]
    assert chunk_plan(meta, ctx, 8) is plan


@functools.cache
def _whole_torch_arm(block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The torch arm without chunking, checked against the reference: once per layout and dtype, not per chunk
    size."""
    return _check(CHUNK_Q_LENS, CHUNK_SEQ_LENS, block_size, dtype, triton=False)


@pytest.mark.parametrize("chunk_tokens", [7, 16, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_torch_arm_chunked_equals_unchunked_and_reference(block_size, dtype, chunk_tokens):
    whole = _whole_torch_arm(block_size, dtype)
    chunked = _check(CHUNK_Q_LENS, CHUNK_SEQ_LENS, block_size, dtype, triton=False, chunk_tokens=chunk_tokens)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(chunked.float(), whole.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="interpreter test runs only without CUDA")
@pytest.mark.parametrize(
    "block_size,dtype,chunk_tokens",
    [(1, torch.float32, 16), (16, torch.float32, 13), (16, torch.bfloat16, 16)],
)
def test_triton_chunked_in_interpreter(block_size, dtype, chunk_tokens):
    """6-7 chunks of one workspace, merged by the Triton LSE merge: equal to the reference and to the
    torch arm over the same chunks."""
    chunked = _check(CHUNK_Q_LENS, CHUNK_SEQ_LENS, block_size, dtype, triton=True, chunk_tokens=chunk_tokens)
    torch_arm = _check(
        CHUNK_Q_LENS, CHUNK_SEQ_LENS, block_size, dtype, triton=False, chunk_tokens=chunk_tokens
    )
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(chunked.float(), torch_arm.float(), atol=tol, rtol=tol)


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="interpreter test runs only without CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_triton_kernel_in_interpreter(block_size, dtype):
    # v_dim 24 pads to 32, rope 8 to 16: the masked head dims
    _check(Q_LENS, SEQ_LENS, block_size, dtype, triton=True)


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="interpreter test runs only without CUDA")
def test_triton_kernel_small_tiles_cross_the_diagonal_in_interpreter():
    """16 x 16 tiles: chunks of several query tiles over prefixes of several unmasked key tiles, a tile
    boundary inside the diagonal, and a chunk ending mid-tile."""
    from meshserve.kernels.mla_prefill import gather_expand
    from meshserve.kernels.triton_mla_prefill import mla_prefill_attention

    meta, cache, q_nope, q_pe, kv_b, scale, ref, rows = _case([40, 1, 17], [75, 5, 17], 4, torch.float32)
    ctx = prefill_context(meta, 4)
    kv, k_pe = gather_expand(cache, kv_b, ctx, 4, torch.float32)
    out = torch.full((q_nope.shape[0], 4, 24), SENTINEL)
    mla_prefill_attention(
        q_nope,
        q_pe,
        kv,
        k_pe,
        ctx.start_loc,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        scale,
        out,
        block_q=16,
        block_n=16,
        num_warps=4,
        num_stages=1,
    )
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert bool((out[40] == SENTINEL).all())


# Compiles the kernels (attention, whole-context and chunked, and the LSE merge) to cubins for sm_90 with Triton's own ptxas (test_triton_unified_attention's check) at
# DeepSeek's head dims with the default configs, and checks that the pipelined tiles fit an H100's shared memory
# (bf16: 128 x 64 tiles, 3 stages, 168 KB; 128 x 128 would need 288 KB).
_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_lse_merge import _merge_lse_kernel
from meshserve.kernels.triton_mla_prefill import _mla_prefill_kernel as kernel, prefill_config

# the whole context in both dtypes; a workspace chunk with its LSE, and the merge, in the GPU's bf16
for dtype, size, chunked in [("bf16", 2, False), ("bf16", 2, True), ("fp32", 4, False)]:
    block_q, block_n, warps, stages = prefill_config(4096, size)
    sig = {n: "*" + dtype for n in ("qn_ptr", "qp_ptr", "kv_ptr", "kpe_ptr", "out_ptr")}
    sig.update(ctx_loc_ptr="*i64", ctx_len_ptr="*i64", q_off_ptr="*i64", qsl_ptr="*i64", lse_ptr="*fp32",
               scale_log2="fp32")
    const = dict(NOPE=128, BLOCK_NOPE=128, ROPE=64, BLOCK_ROPE=64, V_DIM=128, BLOCK_V=128, BLOCK_Q=block_q,
                 BLOCK_N=block_n, HAS_Q_OFF=chunked, WRITE_LSE=chunked, UPCAST_DOT=False,
                 DOT_PRECISION="tf32" if size == 2 else "ieee")
    compiled = compile_sm90(kernel, sig, const, warps, stages)
    assert compiled.metadata.shared <= 227 * 1024, (dtype, compiled.metadata.shared)
    assert "cp.async" in compiled.asm["ptx"], "K/V loads are not pipelined"
    print(dtype, "chunked" if chunked else "whole", "shared", compiled.metadata.shared)
sig = {n: "*bf16" for n in ("out_ptr", "b_ptr")}
sig.update(a_ptr="*fp32", out_lse_ptr="*fp32", a_lse_ptr="*fp32", b_lse_ptr="*fp32", qsl_ptr="*i64")
compile_sm90(_merge_lse_kernel, sig, dict(V_DIM=128, BLOCK_V=128, BLOCK_T=32), 4, 1)
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU: DeepSeek-V2-Lite's shapes
# ----------------------------------------------------------------------------------------------------------
V2_LITE = {"heads": 16, "nope": 128, "rope": 64, "v_dim": 128, "rank": 512}
# 8 prefill chunks (4 over cached prefixes, up to a 4k context) and 3 decode rows
GPU_Q_LENS = [512, 1, 1024, 37, 2048, 1, 300, 129, 1, 4000, 64]
GPU_SEQ_LENS = [512, 900, 1024, 3000, 4096, 17, 300, 1153, 4000, 4000, 2112]


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block_size", [1, 16])
def test_triton_prefill_gpu_v2_lite_bf16(block_size):
    _check(
        GPU_Q_LENS, GPU_SEQ_LENS, block_size, torch.bfloat16, triton=True, device="cuda", atol=2e-2, **V2_LITE
    )


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_triton_prefill_gpu_v2_lite_fp32():
    _check(
        GPU_Q_LENS[:5], GPU_SEQ_LENS[:5], 16, torch.float32, triton=True, device="cuda", atol=1e-4, **V2_LITE
    )


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_triton_prefill_gpu_no_host_sync():
    """Building the step's context and the whole prefill read nothing back from the device (sync debug mode)."""
    import dataclasses

    meta, cache, q_nope, q_pe, kv_b, scale, _, _ = _case(
        GPU_Q_LENS, GPU_SEQ_LENS, 16, torch.bfloat16, "cuda", **V2_LITE
    )
    out = torch.empty(q_nope.shape[0], 16, 128, dtype=torch.bfloat16, device="cuda")
    mla_prefill(q_nope, q_pe, cache, kv_b, meta, scale, out, triton=True)  # compile
    fresh = dataclasses.replace(meta)  # no step memo: the context is built again
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mla_prefill(q_nope, q_pe, cache, kv_b, fresh, scale, out, triton=True)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert fresh.step_memo and fresh.step_memo is not meta.step_memo


# 16k-token cached prefixes under a 512-token chunk and a 40-token one, beside decode rows and a chunk from
# scratch: 16,896 + 300 + 16,424 context rows through a 4k-token workspace (9 chunks)
LONG_Q_LENS = [512, 1, 300, 40, 1]
LONG_SEQ_LENS = [16896, 900, 300, 16424, 17000]


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("block_size", [1, 16])
def test_triton_chunked_prefill_gpu_16k_prefix_v2_lite_bf16(block_size):
    _check(LONG_Q_LENS, LONG_SEQ_LENS, block_size, torch.bfloat16, triton=True, device="cuda", atol=2e-2,
           chunk_tokens=4096, **V2_LITE)  # fmt: skip


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_triton_chunked_prefill_gpu_memory_is_the_workspace():
    """With the workspace, a 33k-token context allocates nothing near its expansion (8 KB/token: 270 MB):
    the step's extra peak is the slot list and the chunk plan; without it, the whole expansion."""
    import dataclasses

    meta, cache, q_nope, q_pe, kv_b, scale, _, _ = _case(
        LONG_Q_LENS, LONG_SEQ_LENS, 16, torch.bfloat16, "cuda", **V2_LITE
    )
    out = torch.empty(q_nope.shape[0], 16, 128, dtype=torch.bfloat16, device="cuda")
    ws = _workspace(4096, q_nope, kv_b, 128)
    expansion = prefill_context(meta, 16).num_tokens * 16 * 256 * 2

    def peak(workspace):
        step = dataclasses.replace(meta)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        mla_prefill(q_nope, q_pe, cache, kv_b, step, scale, out, triton=True, workspace=workspace)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    mla_prefill(q_nope, q_pe, cache, kv_b, dataclasses.replace(meta), scale, out, triton=True, workspace=ws)
    assert peak(ws) < expansion / 20
    assert peak(None) > expansion


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
def test_triton_chunked_prefill_gpu_no_host_sync():
    """The chunk plan, the chunks and the merges read nothing back from the device (sync debug mode)."""
    import dataclasses

    meta, cache, q_nope, q_pe, kv_b, scale, _, _ = _case(
        LONG_Q_LENS, LONG_SEQ_LENS, 16, torch.bfloat16, "cuda", **V2_LITE
    )
    out = torch.empty(q_nope.shape[0], 16, 128, dtype=torch.bfloat16, device="cuda")
    ws = _workspace(4096, q_nope, kv_b, 128)
    mla_prefill(q_nope, q_pe, cache, kv_b, meta, scale, out, triton=True, workspace=ws)  # compile
    fresh = dataclasses.replace(meta)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mla_prefill(q_nope, q_pe, cache, kv_b, fresh, scale, out, triton=True, workspace=ws)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert chunk_plan(fresh, prefill_context(fresh, 16), 4096).num_chunks == 9
