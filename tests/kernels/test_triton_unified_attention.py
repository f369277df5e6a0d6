"""Unified (graph-bound mixed-batch) attention vs the torch reference, on padded CUDA-graph-style metadata.

Without CUDA the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) on
tiny shapes, with small block_q overrides so each sequence spans several q-blocks. `-m gpu` runs the compiled
kernel at realistic shapes and inside a captured torch.cuda.CUDAGraph.

A padded batch (as MixedStepGraphs lays it out): S sequence rows of which the last ones have q_len 0 and
seq_len 0 (query_start_loc repeats its last value), and T tokens of which those at or past
query_start_loc[S] belong to no sequence; their output rows must be zeros.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

_HAS_TRITON = importlib.util.find_spec("triton") is not None
pytestmark = pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_ref import paged_attention_ref
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.quant_fixtures import fp8_kv_cache

if _HAS_TRITON:
    import triton
    import triton.language as tl
    from test_triton_attention import check, make_case, reference

    from meshserve.kernels.triton_attention import TritonAttentionBackend, prefill_attention
    from meshserve.kernels.triton_unified_attention import (
        _seq_of_q_block,
        binary_search_steps,
        unified_attention,
        unified_block_q,
        unified_grid,
    )

    @triton.jit
    def _owner_kernel(qsl_ptr, out_ptr, num_seqs, steps, BLOCK_Q: tl.constexpr):
        b = tl.program_id(0)
        tl.store(out_ptr + b, _seq_of_q_block(qsl_ptr, num_seqs, steps, b, BLOCK_Q))


interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def pad_case(query, cache, meta, num_tokens, num_seqs, seed=0):
    """Pad a real batch to a (T, S) bucket: garbage query rows for the T - real tokens, q_len-0 / seq_len-0
    rows (zero block tables) for the S - real sequences."""
    real_t, real_s = query.shape[0], meta.seq_lens.shape[0]
    assert num_tokens >= real_t and num_seqs >= real_s
    g = torch.Generator().manual_seed(seed)
    garbage = (torch.randn(num_tokens - real_t, *query.shape[1:], generator=g) * 100).to(query.dtype)
    query = torch.cat([query, garbage.to(query.device)])
    qsl = meta.query_start_loc_cpu + [meta.query_start_loc_cpu[-1]] * (num_seqs - real_s)
    seq_lens = meta.seq_lens_cpu + [0] * (num_seqs - real_s)
    tables = torch.zeros(
        num_seqs, meta.block_tables.shape[1], dtype=meta.block_tables.dtype, device=meta.block_tables.device
    )
    tables[:real_s] = meta.block_tables
    dev = meta.seq_lens.device
    padded = AttentionMetadata(
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables,
        max_query_len=num_tokens,  # a capture-time value: the kernel must not depend on it
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
        graph_bound=True,
    )
    return query, padded


def run_unified(query, cache, meta, scale, window, block_q=None, k_scale=1.0, v_scale=1.0):
    out = torch.full_like(query, float("nan"))  # every row must be written (pad rows with zeros)
    unified_attention(
        query,
        cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        scale,
        window,
        out,
        k_scale,
        v_scale,
        block_q=block_q,
    )
    return out


def owners_by_spec(qsl: list[int], block_q: int, num_blocks: int) -> list[int]:
    """The documented mapping, brute force: the largest s with qsl[s] // block_q + s <= b."""
    starts = [qsl[s] // block_q + s for s in range(len(qsl) - 1)]
    return [max(s for s, st in enumerate(starts) if st <= b) for b in range(num_blocks)]


def work_items(qsl: list[int], owners: list[int], block_q: int) -> list[tuple[int, int]]:
    """(sequence, q-tile) pairs that programs with these owners actually compute (the others exit)."""
    items = []
    for b, s in enumerate(owners):
        j = b - (qsl[s] // block_q + s)
        assert j >= 0
        if j * block_q < qsl[s + 1] - qsl[s]:
            items.append((s, j))
    return items


# ----------------------------------------------------------------------------------------------------------
# the q-block mapping
# ----------------------------------------------------------------------------------------------------------
MAPPING_CASES = [
    # query_start_loc, block_q, T
    ([0, 7, 8, 9, 25, 25, 25], 4, 32),  # prefill, decodes, a chunk ending on a block edge, q_len-0 padding
    ([0, 1, 2, 3, 4], 16, 4),  # decodes only: one program each
    ([0, 16, 32, 33], 16, 40),  # chunks exactly one block long, trailing padding tokens
    ([0, 0, 0, 5], 2, 8),  # leading q_len-0 rows
    ([0, 3], 1, 3),  # one sequence, block_q 1
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 9], 2, 13),  # S = 12: a search of 4 halvings
]


def test_mapping_spec_covers_each_tile_once():
    """Pure numpy: for random padded batches, the grid cdiv(T, BQ) + S covers every (sequence, tile) with
    real tokens exactly once, and every other program exits."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        block_q = int(rng.choice([1, 2, 4, 16, 32]))
        num_seqs = int(rng.integers(1, 12))
        real = int(rng.integers(1, num_seqs + 1))
        q_lens = [int(x) for x in rng.choice([0, 1, 1, 3, 16, 17, 40], size=real)]
        qsl = [0, *np.cumsum(q_lens).tolist()]
        qsl += [qsl[-1]] * (num_seqs - real)
        num_tokens = qsl[-1] + int(rng.integers(0, 9))
        if num_tokens == 0:
            continue
        grid0 = unified_grid(num_tokens, num_seqs, 1, block_q)[0]
        owners = owners_by_spec(qsl, block_q, grid0)
        items = work_items(qsl, owners, block_q)
        want = [(s, j) for s in range(num_seqs) for j in range(-(-(qsl[s + 1] - qsl[s]) // block_q))]
        assert sorted(items) == want  # exactly once each
        assert len(set(items)) == len(items)


@interp
@pytest.mark.parametrize("case", range(len(MAPPING_CASES)))
def test_kernel_binary_search_matches_spec_interp(case):
    """The kernel's own binary search (_seq_of_q_block) gives the documented owner for every program,
    including the spare blocks and the blocks past the last sequence's range."""
    qsl, block_q, num_tokens = MAPPING_CASES[case]
    num_seqs = len(qsl) - 1
    grid0 = unified_grid(num_tokens, num_seqs, 1, block_q)[0]
    got = torch.full((grid0,), -1, dtype=torch.int32)
    _owner_kernel[(grid0,)](
        torch.tensor(qsl, dtype=torch.int32), got, num_seqs, binary_search_steps(num_seqs), BLOCK_Q=block_q
    )
    assert got.tolist() == owners_by_spec(qsl, block_q, grid0)


# ----------------------------------------------------------------------------------------------------------
# interpreter (CPU) tests: tiny shapes
# ----------------------------------------------------------------------------------------------------------
UNIFIED_CASES = [
    # q_lens, seq_lens, H, Hkv, D, block_size, window, block_q, (T, S)
    # fresh prefill, decodes, a chunk over a cached prefix; MHA
    ([13, 1, 1, 9, 1], [13, 30, 5, 40, 17], 2, 2, 64, 16, None, 16, (32, 8)),
    # GQA 4, head_dim 128, sliding window, small q-blocks (a chunk spans several)
    ([11, 1, 6, 1], [11, 50, 26, 9], 8, 2, 128, 8, 7, 4, (24, 6)),
    # GQA 8, default block_q (2 tokens x 8 heads = 16 rows), block_size 1
    ([7, 1, 5, 1], [7, 12, 20, 1], 8, 1, 64, 1, None, None, (16, 7)),
    # one sequence (S = 1: no search steps) and trailing padding tokens
    ([7], [12], 4, 2, 32, 4, None, 8, (10, 1)),
]


@interp
@pytest.mark.parametrize("case", range(len(UNIFIED_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unified_padded_batch_interp(case, dtype):
    q_lens, seq_lens, h, hkv, d, bs, window, block_q, (t, s) = UNIFIED_CASES[case]
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, bs, dtype, seed=20 + case)
    pq, pmeta = pad_case(query, cache, meta, t, s, seed=case)
    out = run_unified(pq, cache, pmeta, d**-0.5, window, block_q=block_q)
    real = sum(q_lens)
    check(out, reference(pq, cache, pmeta, d**-0.5, window), dtype)
    check(out[:real], reference(query, cache, meta, d**-0.5, window), dtype)  # the unpadded batch
    assert (out[real:] == 0).all()


@interp
def test_unified_same_bucket_two_batches_interp():
    """One (T, S) bucket, two different batches (different max_query_len and sequence count), one launch
    configuration: both match the reference."""
    t, s, h, hkv, d = 24, 5, 4, 1, 32
    for seed, (q_lens, seq_lens) in enumerate(
        (([17, 1, 1], [30, 8, 3]), ([2, 1, 1, 1, 3], [2, 9, 14, 6, 3]))
    ):
        query, cache, meta = make_case(
            q_lens, seq_lens, h, hkv, d, 4, torch.float32, seed=40 + seed, table_width=8
        )
        pq, pmeta = pad_case(query, cache, meta, t, s, seed=seed)
        out = run_unified(pq, cache, pmeta, 0.2, None, block_q=4)
        check(out, reference(pq, cache, pmeta, 0.2, None), torch.float32)
        assert (out[sum(q_lens) :] == 0).all()


@interp
@pytest.mark.parametrize("v_layout", ["rows", "transposed"])
def test_unified_fp8_kv_interp(v_layout, monkeypatch):
    """fp8 (e4m3) KV cache with k/v scales: reads dequantize like the reference, in both of V's block layouts
    (MESHSERVE_FP8_V_LAYOUT: kernels/kv_layout.py)."""
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", v_layout)
    query, cache, meta = make_case([9, 1, 5], [9, 33, 21], 8, 2, 32, 8, torch.float32, seed=50)
    cache8 = fp8_kv_cache(cache, 0.5)
    if v_layout == "transposed":  # the same logical V, each block's bytes as [Hkv, D, block_size]
        from meshserve.kernels.kv_layout import to_transposed

        cache8 = to_transposed(cache8)
    pq, pmeta = pad_case(query, cache, meta, 20, 5)
    out = run_unified(pq, cache8, pmeta, 0.2, None, block_q=4, k_scale=0.5, v_scale=0.5)
    ref = paged_attention_ref(pq, cache8, pmeta, 0.2, None, 0.5, 0.5)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert (out[15:] == 0).all()


@interp
@pytest.mark.parametrize("graph_bound", [False, True])
def test_backend_dispatch_interp(graph_bound, monkeypatch):
    """TritonAttentionBackend.attend uses unified_attention exactly for multi-token steps that are graph-bound
    or hold decode rows (eager mixed steps: the prefill grid would be S x q-tiles programs)."""
    from meshserve.kernels import triton_unified_attention

    calls = []
    real_fn = triton_unified_attention.unified_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_fn(*args, **kwargs)

    monkeypatch.setattr(triton_unified_attention, "unified_attention", spy)
    query, cache, meta = make_case([6, 1, 3], [6, 10, 12], 4, 2, 32, 4, torch.float32, seed=60)
    pq, pmeta = pad_case(query, cache, meta, 16, 4)
    pmeta.graph_bound = graph_bound
    out = TritonAttentionBackend().attend(pq, cache, pmeta, 0.2, None)
    assert calls == [pq.shape]  # both: the batch has a decode row
    check(out[:10], reference(query, cache, meta, 0.2, None), torch.float32)
    assert (out[10:] == 0).all()  # the unified kernel zeroes the padding rows
    # prompts only, eager: the prefill kernel
    calls.clear()
    pq2, pcache2, pmeta2 = make_case([6, 3], [6, 12], 4, 2, 32, 4, torch.float32, seed=62)
    pmeta2.graph_bound = graph_bound
    out2 = TritonAttentionBackend().attend(pq2, pcache2, pmeta2, 0.2, None)
    assert calls == ([pq2.shape] if graph_bound else [])
    check(out2, reference(pq2, pcache2, pmeta2, 0.2, None), torch.float32)
    # decode-only steps stay on the decode kernel even when graph-bound
    calls.clear()
    dq, dcache, dmeta = make_case([1, 1], [5, 9], 4, 2, 32, 4, torch.float32, seed=61)
    dmeta.graph_bound = graph_bound
    TritonAttentionBackend().attend(dq, dcache, dmeta, 0.2, None)
    assert calls == []


# Compiles the kernel to a cubin for sm_90 with Triton's own ptxas: no GPU needed, and it catches codegen errors
# the interpreter cannot (loop-carried types, scalar conditions, constants specialised to 1).
_COMPILE_SM90 = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_unified_attention import _unified_attention_kernel as kernel

names = list(kernel.arg_names)
for qdtype, cdtype, qsl, group, window, fp8, one_seq in [("bf16", "bf16", "i32", 4, True, False, False),
                                                         ("fp16", "fp8e4nv", "i64", 1, False, True, True)]:
    sig = {n: "i32" for n in names}
    sig.update(q_ptr="*" + qdtype, out_ptr="*" + qdtype, cache_ptr="*" + cdtype, bt_ptr="*i32",
               seq_lens_ptr="*i32", qsl_ptr="*" + qsl, scale_log2="fp32", k_scale="fp32", v_scale="fp32",
               stride_ckv="i64", stride_cb="i64")
    const = dict(GROUP=group, GROUP_PAD=group, BLOCK_Q=128 // group, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16,
                 BLOCK_N=64, USE_WINDOW=window, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=fp8,
                 SKIP_SINGLE=not one_seq, DIAG_MASK_ONLY=not one_seq)
    if one_seq:  # an S = 1 bucket, if the launcher turns arguments equal to 1 into constants
        const.update(num_seqs=1, search_steps=1)
    sig.update({n: "constexpr" for n in const})
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernel for the real device")
def test_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


def test_block_q_depends_on_head_dim_and_group_only():
    # ROWS = block_q * group_pad: 128 up to head_dim 128, 64 beyond, never below 16
    assert unified_block_q(128, 1) == 128
    assert unified_block_q(128, 4) == 32
    assert unified_block_q(64, 8) == 16
    assert unified_block_q(256, 8) == 8
    assert unified_block_q(128, 32) == 4
    assert unified_grid(512, 64, 8, 32) == (16 + 64, 8)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu)
# ----------------------------------------------------------------------------------------------------------
def _mixed_bucket_batch(num_tokens, num_seqs, max_ctx, seed, num_prefill=3):
    """A realistic mixed step that fits the (T, S) bucket: decodes over contexts up to max_ctx, a few prefill
    chunks (one over a cached prefix), some q_len-0 sequences and trailing padding tokens."""
    g = torch.Generator().manual_seed(seed)
    num_real = num_seqs - 4
    q_lens = [1] * (num_real - num_prefill)
    budget = num_tokens - len(q_lens) - 9  # leave trailing padding tokens
    chunks = torch.randint(
        budget // (2 * num_prefill), budget // num_prefill + 1, (num_prefill,), generator=g
    )
    q_lens += chunks.tolist()
    ctx = torch.randint(1, max_ctx + 1, (num_real,), generator=g).tolist()
    seq_lens = [max(c, q) for c, q in zip(ctx, q_lens)]
    seq_lens[-1] = min(max_ctx, q_lens[-1] + 1000)  # a chunk over a cached prefix
    seq_lens[-2] = q_lens[-2]  # a fresh prompt
    perm = torch.randperm(num_real, generator=g).tolist()
    return [q_lens[i] for i in perm], [seq_lens[i] for i in perm]


@gpu
@pytest.mark.parametrize("heads", [(32, 8), (64, 8), (8, 8)])
@pytest.mark.parametrize("window", [None, 1000])
def test_unified_matches_prefill_and_reference_gpu(heads, window):
    h, hkv = heads
    t, s, d = 512, 64, 128
    q_lens, seq_lens = _mixed_bucket_batch(t, s, 2048, seed=h + (window or 0))
    query, cache, meta = make_case(
        q_lens, seq_lens, h, hkv, d, 16, torch.bfloat16, device="cuda", table_width=2048 // 16
    )
    pq, pmeta = pad_case(query, cache, meta, t, s)
    out = run_unified(pq, cache, pmeta, d**-0.5, window)
    real = sum(q_lens)
    check(out, reference(pq, cache, pmeta, d**-0.5, window), torch.bfloat16, on_gpu=True)
    assert (out[real:] == 0).all()
    fast = torch.empty_like(query)
    prefill_attention(
        query,
        cache,
        meta.block_tables,
        meta.seq_lens,
        meta.query_start_loc,
        meta.max_query_len,
        d**-0.5,
        window,
        fast,
    )
    torch.testing.assert_close(out[:real], fast, atol=2e-2, rtol=2e-2)


@gpu
def test_unified_fp8_kv_gpu():
    t, s, h, hkv, d = 512, 64, 32, 8, 128
    q_lens, seq_lens = _mixed_bucket_batch(t, s, 2048, seed=5)
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, 16, torch.bfloat16, device="cuda")
    cache8 = fp8_kv_cache(cache, 0.02)
    pq, pmeta = pad_case(query, cache, meta, t, s)
    out = run_unified(pq, cache8, pmeta, d**-0.5, None, k_scale=0.02, v_scale=0.02)
    ref = paged_attention_ref(pq.float(), cache8, pmeta, d**-0.5, None, 0.02, 0.02)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    assert (out[sum(q_lens) :] == 0).all()


@gpu
def test_unified_cuda_graph_gpu():
    """Capture attend() on graph-bound metadata at one (T, S) bucket; replay on two different batches."""
    torch.manual_seed(0)
    t, s, h, hkv, d, bs, max_ctx = 512, 64, 32, 8, 128, 16, 2048
    width = max_ctx // bs
    dev, dtype = "cuda", torch.bfloat16
    cache = torch.randn(2, s * width + 8, bs, hkv, d, device=dev, dtype=dtype)
    q_buf = torch.zeros(t, h, d, device=dev, dtype=dtype)
    tables = torch.zeros(s, width, dtype=torch.int32, device=dev)
    seq_lens = torch.zeros(s, dtype=torch.int32, device=dev)
    qsl = torch.zeros(s + 1, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        torch.full((t,), -1, dtype=torch.int64, device=dev),
        qsl,
        seq_lens,
        tables,
        t,
        max_ctx,
        [0] * (s + 1),
        [0] * s,
        graph_bound=True,
    )
    backend = TritonAttentionBackend()

    def load(seed):
        q_lens, lens = _mixed_bucket_batch(t, s, max_ctx, seed=seed, num_prefill=2 + seed % 3)
        query, _, real_meta = make_case(q_lens, lens, h, hkv, d, bs, dtype, device=dev, table_width=width)
        real_meta.block_tables = (
            torch.randperm(cache.shape[1], device=dev)[: len(lens) * width]
            .view(len(lens), width)
            .to(torch.int32)
        )
        pq, pmeta = pad_case(query, cache, real_meta, t, s, seed=seed)
        q_buf.copy_(pq)
        tables.copy_(pmeta.block_tables)
        seq_lens.copy_(pmeta.seq_lens)
        qsl.copy_(pmeta.query_start_loc)
        return pq.clone(), pmeta, sum(q_lens)

    load(0)
    backend.attend(q_buf, cache, meta, d**-0.5, None)  # warm up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(q_buf, cache, meta, d**-0.5, None)
    for seed in (1, 2):
        pq, pmeta, real = load(seed)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        check(out, reference(pq, cache, pmeta, d**-0.5, None), dtype, on_gpu=True)
        assert (out[real:] == 0).all()
