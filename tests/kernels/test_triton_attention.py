"""Triton attention kernels vs the torch reference (meshserve.kernels.attention_ref).

Without CUDA the kernels run in the Triton CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) on
tiny shapes. `-m gpu` runs the real kernels on CUDA over production-like shapes.

Tolerances: fp32 atol/rtol 1e-4 in the interpreter (TF32 dot on GPU: 1e-2); fp16 and bf16 compare against the
reference computed in fp32 from the same rounded inputs with atol 2e-2, rtol 2e-2.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

if importlib.util.find_spec("triton") is not None:
    from meshserve.kernels.triton_attention import TritonAttentionBackend, decode_num_splits

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_ref import paged_attention_ref, write_kv_ref
from tests.kernels.sm90 import assert_compiles_for_sm90

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def _tol(dtype, on_gpu=False):
    if dtype == torch.float32:
        return (1e-2, 1e-2) if on_gpu else (1e-4, 1e-4)  # GPU: fp32 tl.dot runs in TF32
    return 2e-2, 2e-2


def make_case(q_lens, seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, device="cpu", seed=0,
              extra_blocks=3, table_width=None, qsl=None):
    """Random query [T, H, D], a KV cache with randomly permuted blocks, and the metadata."""
    g = torch.Generator().manual_seed(seed)
    b = len(seq_lens)
    need = [-(-s // block_size) for s in seq_lens]
    width = table_width or max(max(need), 1)
    num_blocks = sum(need) + extra_blocks
    perm = torch.randperm(num_blocks, generator=g)
    tables = torch.zeros(b, width, dtype=torch.int32)
    k = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[k : k + n]
        k += n
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    if qsl is None:
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
    total = qsl[-1]
    query = torch.randn(total, num_heads, head_dim, generator=g).to(dtype)
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(total, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=tables.to(device),
        max_query_len=max(q_lens) if q_lens else 0,
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=list(qsl),
        seq_lens_cpu=list(seq_lens),
    )
    return query.to(device), cache.to(device), meta


def reference(query, cache, meta, scale, window):
    """The torch reference in fp32 over the same (rounded) inputs."""
    return paged_attention_ref(query.float(), cache.float(), meta, scale, window)


def check(out, ref, dtype, on_gpu=False, rows=None):
    atol, rtol = _tol(dtype, on_gpu)
    if rows is not None:
        out, ref = out[rows], ref[rows]
    assert out.dtype == dtype
    assert torch.isfinite(out.float()).all()
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------------------
# interpreter (CPU) tests: tiny shapes
# ----------------------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16])
def test_write_kv_interp(dtype, block_size):
    g = torch.Generator().manual_seed(1)
    t, hkv, d, num_blocks = 7, 2, 24, 8
    # (in the cache dtype: the interpreter rounds fp32 -> bf16 differently from torch; GPU casts match)
    qkv = torch.randn(t, (4 + 2 * hkv) * d, generator=g).to(dtype)
    k = qkv[:, 4 * d : (4 + hkv) * d].view(t, hkv, d)  # non-contiguous, as split from a fused projection
    v = qkv[:, (4 + hkv) * d :].view(t, hkv, d)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:t].to(torch.int64)
    slots[2] = -1  # padding: writes nothing
    cache = torch.randn(2, num_blocks, block_size, hkv, d, generator=g).to(dtype)
    expect = cache.clone()
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], expect, slots[keep])
    TritonAttentionBackend().write_kv(k, v, cache, slots)
    torch.testing.assert_close(cache, expect, atol=0, rtol=0)


PREFILL_CASES = [
    # q_lens, seq_lens, H, Hkv, D, block_size, window
    ([5, 1, 17], [5, 40, 30], 4, 2, 32, 16, None),  # prefill, decode, chunk over a cached prefix
    ([9, 3, 0, 2], [20, 70, 9, 2], 8, 1, 64, 4, 7),  # GQA 8, sliding window, a q_len-0 row
    ([6, 20], [6, 33], 3, 3, 24, 1, None),  # MHA, head_dim 24, block_size 1
    ([16, 2], [40, 2], 4, 1, 32, 32, 5),  # window smaller than a KV tile
]


@interp
@pytest.mark.parametrize("case", range(len(PREFILL_CASES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_prefill_interp(case, dtype):
    q_lens, seq_lens, h, hkv, d, bs, window = PREFILL_CASES[case]
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, bs, dtype, seed=case)
    out = TritonAttentionBackend().attend(query, cache, meta, d**-0.5, window)
    check(out, reference(query, cache, meta, d**-0.5, window), dtype)


@interp
@pytest.mark.parametrize("graph_bound", [False, True])
@pytest.mark.parametrize("case", [0, 1])
def test_mixed_batch_splits_decode_rows_interp(case, graph_bound):
    """A mixed batch's one-token rows go to the split-K decode kernel, the rest to the unified kernel with
    those rows skipped (eager or graph-bound): every row is written once, by one of them."""
    q_lens, seq_lens, h, hkv, d, bs, window = PREFILL_CASES[case]
    q_lens, seq_lens = [*q_lens, 1], [*seq_lens, 23]  # one more decode row, so each case has several
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, bs, torch.float32, seed=10 + case)
    meta.graph_bound = graph_bound
    assert meta.num_single_query_seqs == q_lens.count(1)
    out = TritonAttentionBackend(decode_num_splits=2).attend(query, cache, meta, d**-0.5, window)
    check(out, reference(query, cache, meta, d**-0.5, window), torch.float32)


DECODE_CASES = [
    # seq_lens, H, Hkv, D, block_size, window
    ([5, 100, 300], 8, 2, 24, 16, None),
    ([1, 77, 260], 4, 4, 64, 32, 50),
    ([130, 3], 8, 1, 32, 8, None),
]


def _decode_params():
    """dtype x splits x case: bf16 over every split count (the default, one, three: the split-KV reduce), fp32
    (the same kernels, another load dtype) at the default splits; fp32 with fixed splits with -m slow."""
    for dtype in (torch.float32, torch.bfloat16):
        for splits in (None, 1, 3):
            for case in range(len(DECODE_CASES)):
                slow = dtype == torch.float32 and splits is not None
                yield pytest.param(case, splits, dtype, marks=pytest.mark.slow if slow else ())


@interp
@pytest.mark.parametrize(("case", "splits", "dtype"), list(_decode_params()))
def test_decode_interp(case, splits, dtype):
    seq_lens, h, hkv, d, bs, window = DECODE_CASES[case]
    query, cache, meta = make_case([1] * len(seq_lens), seq_lens, h, hkv, d, bs, dtype, seed=10 + case)
    out = TritonAttentionBackend(decode_num_splits=splits).attend(query, cache, meta, d**-0.5, window)
    check(out, reference(query, cache, meta, d**-0.5, window), dtype)


@interp
@pytest.mark.parametrize("case", range(len(DECODE_CASES)))
def test_decode_inline_reduce_interp(case):
    """The last split of each (sequence, KV head) combines the partials (no reduce launch): the output equals
    the reduce kernel's to fp32 rounding, and every ticket is back at zero (the next launch, or a graph
    replay, starts from there), whichever split finished last."""
    from meshserve.kernels import triton_attention

    seq_lens, h, hkv, d, bs, window = DECODE_CASES[case]
    query, cache, meta = make_case([1] * len(seq_lens), seq_lens, h, hkv, d, bs, torch.float32, seed=20 + case)
    expect = TritonAttentionBackend(decode_num_splits=3).attend(query, cache, meta, d**-0.5, window)
    inline = TritonAttentionBackend(decode_num_splits=3, inline_reduce=True)
    for _ in range(2):  # twice: the tickets left at zero by the first launch serve the second
        out = inline.attend(query, cache, meta, d**-0.5, window)
        torch.testing.assert_close(out, expect, atol=1e-5, rtol=1e-5)
        assert not triton_attention._ticket_workspace(query.device).any()
    check(out, reference(query, cache, meta, d**-0.5, window), torch.float32)
    one = TritonAttentionBackend(decode_num_splits=1, inline_reduce=True).attend(query, cache, meta, d**-0.5, window)
    check(one, reference(query, cache, meta, d**-0.5, window), torch.float32)  # one split: the direct path


@interp
def test_decode_inline_reduce_padding_rows_interp():
    """Rows the split kernel skips (q_len 0: CUDA-graph padding) take no ticket and write nothing."""
    from meshserve.kernels import triton_attention

    query, cache, meta = make_case([1, 0, 1], [40, 1, 7], 4, 2, 32, 16, torch.float32, seed=5, table_width=8)
    meta.max_seq_len = 128
    out = TritonAttentionBackend(decode_num_splits=4, inline_reduce=True).attend(query, cache, meta, 0.2, None)
    assert not triton_attention._ticket_workspace(query.device).any()
    check(out, reference(query, cache, meta, 0.2, None), torch.float32)


@interp
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_padding_rows_interp(splits):
    """CUDA-graph style padding: seq_len 0 rows give zeros; more splits than tiles is fine."""
    seq_lens = [40, 0, 7, 0]
    query, cache, meta = make_case([1] * 4, [40, 1, 7, 1], 4, 2, 32, 16, torch.float32, seed=3,
                                   table_width=8)
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta.seq_lens_cpu = seq_lens
    meta.max_seq_len = 128  # fixed "capture" value, larger than any real length
    out = TritonAttentionBackend(decode_num_splits=splits).attend(query, cache, meta, 0.2, None)
    ref = reference(query, cache, meta, 0.2, None)
    check(out, ref, torch.float32, rows=[0, 2])
    assert (out[[1, 3]] == 0).all()


@interp
@pytest.mark.parametrize("q_lens", [[3, 1, 5], [1, 1, 1]])
def test_strided_query_interp(q_lens):
    """q as a view of a fused qkv projection (row stride > H * D)."""
    seq_lens = [3, 20, 9]
    query, cache, meta = make_case(q_lens, seq_lens, 4, 2, 32, 8, torch.float32, seed=4)
    t = query.shape[0]
    qkv = torch.randn(t, (4 + 2 * 2) * 32)
    qkv[:, : 4 * 32] = query.flatten(1)
    q_view = qkv[:, : 4 * 32].view(t, 4, 32)
    out = TritonAttentionBackend().attend(q_view, cache, meta, 0.2, None)
    assert out.is_contiguous()
    check(out, reference(query, cache, meta, 0.2, None), torch.float32)


@interp
def test_full_layer_roundtrip_interp():
    """write_kv then prefill then decode, as the attention layer calls them, against the torch backend."""
    from meshserve.layers.attention import TorchAttentionBackend

    g = torch.Generator().manual_seed(5)
    h, hkv, d, bs, num_blocks = 4, 2, 32, 4, 12
    tables = torch.tensor([[3, 7, 1, 0], [2, 5, 9, 11]], dtype=torch.int32)
    caches = [torch.zeros(2, num_blocks, bs, hkv, d) for _ in range(2)]
    backends = [TritonAttentionBackend(), TorchAttentionBackend()]
    lens = [0, 0]
    for q_lens in ([6, 9], [1, 1], [1, 1]):
        qsl = [0, q_lens[0], q_lens[0] + q_lens[1]]
        new_lens = [lens[i] + q_lens[i] for i in range(2)]
        pos = [p for i in range(2) for p in range(lens[i], new_lens[i])]
        seq = [i for i in range(2) for _ in range(q_lens[i])]
        slots = torch.tensor([int(tables[s, p // bs]) * bs + p % bs for s, p in zip(seq, pos)])
        meta = AttentionMetadata(slots, torch.tensor(qsl, dtype=torch.int32),
                                 torch.tensor(new_lens, dtype=torch.int32), tables, max(q_lens), max(new_lens),
                                 qsl, new_lens)
        q = torch.randn(qsl[-1], h, d, generator=g)
        k = torch.randn(qsl[-1], hkv, d, generator=g)
        v = torch.randn(qsl[-1], hkv, d, generator=g)
        outs = []
        for be, cache in zip(backends, caches):
            be.write_kv(k, v, cache, slots)
            outs.append(be.attend(q, cache, meta, 0.25, None))
        torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)
        torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
        lens = new_lens


def test_decode_num_splits_heuristic():
    # few programs + long context -> many splits; big batch -> 1; short context -> 1; bounded, power of 2
    assert decode_num_splits(1, 8, 32768, 64, 132) == 32
    assert decode_num_splits(64, 8, 32768, 64, 132) == 1
    assert decode_num_splits(16, 8, 2048, 128, 132) == 1  # 128 programs already fill an H100 once
    assert decode_num_splits(8, 8, 2048, 128, 132) == 4
    assert decode_num_splits(1, 8, 100, 64, 132) == 1
    assert decode_num_splits(2, 4, 2048, 64, 132, max_splits=16) == 8
    for b in (1, 3, 8, 64):
        n = decode_num_splits(b, 2, 5000, 64, 132)
        assert n & (n - 1) == 0
    # min_splits: a context of two tiles or more in a grid that leaves SMs idle takes at least two splits (one
    # tile each at least); one tile, a full grid or a longer context as before
    assert [decode_num_splits(1, 4, n, 128, 132, min_splits=2) for n in (100, 128, 129, 256, 1024)] == [1, 1, 2, 2, 4]
    assert decode_num_splits(1, 4, 256, 128, 132) == 1
    assert decode_num_splits(64, 4, 256, 128, 132, min_splits=2) == 1
    assert decode_num_splits(1, 4, 1024, 128, 132, min_splits=8) == 8


def test_decode_tile_takes_small_ctas_on_grids_of_two_waves():
    from meshserve.kernels.triton_attention import GRID_TILE, decode_tile

    default = (None, 4, None)
    assert decode_tile(33, 8, 128, 132) == GRID_TILE  # 264 programs: two per SM of an H200
    assert decode_tile(32, 8, 128, 132) == default  # 256: the measured batch-16/32 side stays
    assert decode_tile(256, 8, 128, 132) == GRID_TILE and decode_tile(17, 16, 64, 132) == GRID_TILE
    assert decode_tile(256, 8, 256, 132) == default  # wider heads: not measured
    backend = TritonAttentionBackend()  # "auto": the grid tile over an fp8 cache, not over a 16-bit one
    assert backend.takes_grid_tile(True) and not backend.takes_grid_tile(False)
    assert TritonAttentionBackend(grid_tile="grid").takes_grid_tile(False)
    assert backend.grid_tile_min_seqs(8, 128, torch.device("cpu"), True) is None  # the interpreter keeps its tiles
    assert backend.grid_tile_min_seqs(8, 128, torch.device("cuda"), False) is None  # bf16 keeps the one tile
    assert TritonAttentionBackend(grid_tile="legacy").grid_tile_min_seqs(8, 128, torch.device("cuda"), True) is None
    assert backend.grid_tile_min_seqs(8, 256, torch.device("cuda"), True) is None
    # the balanced kernel (MESHSERVE_DECODE_BALANCED) is a variant of its own at the same batches, any cache
    balanced = TritonAttentionBackend(balanced=4)
    assert balanced.grid_tile_min_seqs(8, 128, torch.device("cuda"), False) == \
        backend.grid_tile_min_seqs(8, 128, torch.device("cuda"), True)
    assert balanced.grid_tile_min_seqs(8, 128, torch.device("cpu"), False) is None
    assert balanced.grid_tile_min_seqs(8, 256, torch.device("cuda"), False) is None  # wider heads keep the split
    with pytest.raises(ValueError, match="grid_tile"):
        TritonAttentionBackend(grid_tile="small")
    rows = backend.grid_tile_min_seqs(8, 128, torch.device("cuda"), True)
    assert rows == TritonAttentionBackend(grid_tile="grid").grid_tile_min_seqs(8, 128, torch.device("cuda"))
    from meshserve.kernels.triton_attention import _num_sms

    sms = _num_sms(0)
    assert decode_tile(rows, 8, 128, sms) == GRID_TILE and decode_tile(rows - 1, 8, 128, sms) == default


# The prefill and split-K decode kernels share their KV-tile step with the unified kernel
# (kernels/triton_attention_tile.py): compiled to sm_90 cubins with Triton's own ptxas (no GPU needed), as
# test_triton_unified_attention does for the unified kernel, causal with a window and not causal with fp8 KV.
_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_attention import _decode_split_kernel, _prefill_attention_kernel

def compile_sm90(kernel, sig, const, warps, stages):
    names = list(kernel.arg_names)
    sig = {**{n: "i32" for n in names}, **sig, **{n: "constexpr" for n in const}}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

sig = dict(q_ptr="*bf16", out_ptr="*bf16", cache_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i64",
           scale_log2="fp32", k_scale="fp32", v_scale="fp32", stride_ckv="i64", stride_cb="i64")
compile_sm90(_prefill_attention_kernel, sig,
             dict(GROUP=4, GROUP_PAD=4, BLOCK_Q=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64,
                  USE_WINDOW=True, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=False, SKIP_SINGLE=True,
                  DIAG_MASK_ONLY=True), 8, 3)
sig.update(cache_ptr="*fp8e4nv", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32")
compile_sm90(_decode_split_kernel, sig,
             dict(NUM_HEADS=32, GROUP=4, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
                  USE_WINDOW=True, DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=True,
                  USE_GDC=False, LAST_REDUCES=False, FP8_TILE="convert"), 4, 3)
# the grid tile (decode_tile) over an fp8 cache: 64 tokens, 2 warps, 2 stages, one split writing the output
compile_sm90(_decode_split_kernel, sig,
             dict(NUM_HEADS=16, GROUP=2, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64,
                  USE_WINDOW=False, DIRECT_OUT=True, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=True,
                  USE_GDC=False, LAST_REDUCES=False, FP8_TILE="convert"), 2, 2)
sig.update(ticket_ptr="*i32")  # the inline reduce: the ticket atomics and the last split's combine
compile_sm90(_decode_split_kernel, sig,
             dict(NUM_HEADS=32, GROUP=4, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
                  USE_WINDOW=False, DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=False,
                  USE_GDC=False, LAST_REDUCES=True, FP8_TILE="convert"), 4, 3)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_prefill_and_decode_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu)
# ----------------------------------------------------------------------------------------------------------
GQA = [(32, 32), (32, 8), (32, 4)]


def _rand_lens(n, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_kv_gpu(dtype, block_size):
    g = torch.Generator(device="cuda").manual_seed(0)
    t, hkv, d, num_blocks = 300, 8, 128, 64
    k = torch.randn(t, hkv, d, device="cuda", generator=g, dtype=dtype)
    v = torch.randn(t, hkv, d, device="cuda", generator=g, dtype=dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=g)[:t]
    slots[::7] = -1
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device="cuda", generator=g, dtype=dtype)
    expect = cache.clone()
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], expect, slots[keep])
    TritonAttentionBackend().write_kv(k, v, cache, slots)
    torch.testing.assert_close(cache, expect, atol=0, rtol=0)


@gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("batch,max_len", [(1, 32768), (8, 8192), (64, 2048)])
def test_decode_gpu(head_dim, heads, block_size, batch, max_len):
    h, hkv = heads
    seq_lens = _rand_lens(batch, 1, max_len, seed=batch)
    seq_lens[0] = max_len
    query, cache, meta = make_case([1] * batch, seq_lens, h, hkv, head_dim, block_size, torch.bfloat16,
                                   device="cuda")
    scale = head_dim**-0.5
    ref = reference(query, cache, meta, scale, None)
    for splits in (None, 1, 7):
        for inline in (False, True):  # the reduce launch, or each group's last split (MESHSERVE_DECODE_REDUCE)
            backend = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline)
            out = backend.attend(query, cache, meta, scale, None)
            check(out, ref, torch.bfloat16, on_gpu=True)
    # a bf16 cache keeps the one tile by default ("auto"); batch 64 takes the grid tile where asked for
    check(TritonAttentionBackend(grid_tile="grid").attend(query, cache, meta, scale, None), ref, torch.bfloat16,
          on_gpu=True)
    from meshserve.kernels.triton_attention import _ticket_workspace

    assert not _ticket_workspace(query.device).any()  # every ticket back at zero


@gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", GQA)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("window", [None, 1000])
def test_mixed_chunked_prefill_gpu(head_dim, heads, block_size, window):
    """Prefill chunks over cached prefixes, a fresh prompt and decodes in one batch."""
    h, hkv = heads
    q_lens = [512, 1, 300, 1, 2048, 1, 37, 1]
    seq_lens = [1536, 4000, 300, 17, 2048, 9000, 5037, 1]
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, head_dim, block_size, torch.bfloat16,
                                   device="cuda")
    scale = head_dim**-0.5
    out = TritonAttentionBackend().attend(query, cache, meta, scale, window)
    check(out, reference(query, cache, meta, scale, window), torch.bfloat16, on_gpu=True)


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim,heads", [(24, (4, 2)), (32, (4, 2)), (128, (32, 8))])
def test_prefill_dtypes_gpu(dtype, head_dim, heads):
    h, hkv = heads
    q_lens = [128, 77, 1, 300]
    seq_lens = [128, 500, 64, 1300]
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, head_dim, 16, dtype, device="cuda")
    out = TritonAttentionBackend().attend(query, cache, meta, head_dim**-0.5, None)
    check(out, reference(query, cache, meta, head_dim**-0.5, None), dtype, on_gpu=True)
    meta1 = make_case([1] * 4, seq_lens, h, hkv, head_dim, 16, dtype, device="cuda")
    out = TritonAttentionBackend().attend(*meta1[:2], meta1[2], head_dim**-0.5, 64)
    check(out, reference(*meta1[:2], meta1[2], head_dim**-0.5, 64), dtype, on_gpu=True)


@gpu
@pytest.mark.parametrize("block_size", [1, 8, 64, 128])
def test_odd_block_sizes_gpu(block_size):
    q_lens = [64, 1, 200]
    seq_lens = [64, 333, 1000]
    query, cache, meta = make_case(q_lens, seq_lens, 32, 8, 128, block_size, torch.bfloat16, device="cuda")
    out = TritonAttentionBackend().attend(query, cache, meta, 0.088, None)
    check(out, reference(query, cache, meta, 0.088, None), torch.bfloat16, on_gpu=True)
    query, cache, meta = make_case([1] * 3, seq_lens, 32, 8, 128, block_size, torch.bfloat16, device="cuda")
    out = TritonAttentionBackend().attend(query, cache, meta, 0.088, None)
    check(out, reference(query, cache, meta, 0.088, None), torch.bfloat16, on_gpu=True)


@gpu
@pytest.mark.parametrize("splits,inline", [(None, False), (1, False), (None, True), (7, True)])
def test_decode_cuda_graph_gpu(splits, inline):
    """Capture write_kv + decode attention once; replay with new seq_lens/slots/queries (and padding rows)."""
    torch.manual_seed(0)
    bs_max, h, hkv, d, block_size, max_model_len = 8, 32, 8, 128, 16, 4096
    max_blocks = max_model_len // block_size
    num_blocks = bs_max * max_blocks
    dev, dtype = "cuda", torch.bfloat16
    cache = torch.randn(2, num_blocks, block_size, hkv, d, device=dev, dtype=dtype)
    tables = torch.randperm(num_blocks, device=dev).view(bs_max, max_blocks).to(torch.int32)
    # static buffers
    q_buf = torch.zeros(bs_max, h, d, device=dev, dtype=dtype)
    k_buf = torch.zeros(bs_max, hkv, d, device=dev, dtype=dtype)
    v_buf = torch.zeros(bs_max, hkv, d, device=dev, dtype=dtype)
    slots = torch.full((bs_max,), -1, dtype=torch.int64, device=dev)
    seq_lens = torch.zeros(bs_max, dtype=torch.int32, device=dev)
    qsl = torch.arange(bs_max + 1, dtype=torch.int32, device=dev)
    meta = AttentionMetadata(slots, qsl, seq_lens, tables, 1, max_model_len, list(range(bs_max + 1)),
                             [0] * bs_max)
    backend = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline)

    def step():
        backend.write_kv(k_buf, v_buf, cache, slots)
        return backend.attend(q_buf, cache, meta, d**-0.5, None)

    step()  # warm up / compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    for trial, n in enumerate([8, 3, 5]):
        lens = _rand_lens(n, 1, max_model_len, seed=100 + trial)
        lens[0] = max_model_len if trial == 0 else lens[0]
        q_buf.normal_()
        k_buf.normal_()
        v_buf.normal_()
        seq_lens.zero_()
        seq_lens[:n] = torch.tensor(lens, dtype=torch.int32)
        slots.fill_(-1)
        slots[:n] = torch.tensor([int(tables[i, (L - 1) // block_size]) * block_size + (L - 1) % block_size
                                  for i, L in enumerate(lens)], device=dev)
        graph.replay()
        torch.cuda.synchronize()
        # reference on the real rows (the cache now holds the new K/V at the last position)
        ref_meta = AttentionMetadata(slots[:n], qsl[: n + 1], seq_lens[:n], tables[:n], 1, max(lens),
                                     list(range(n + 1)), lens)
        ref = reference(q_buf[:n], cache, ref_meta, d**-0.5, None)
        check(out[:n], ref, dtype, on_gpu=True)
        assert (out[n:] == 0).all()  # padding rows: seq_len 0 -> zeros
        last = cache[0, tables[0, (lens[0] - 1) // block_size].long(), (lens[0] - 1) % block_size]
        torch.testing.assert_close(last, k_buf[0], atol=0, rtol=0)
