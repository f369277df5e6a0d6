"""The persistent unified kernel, its work list, and every tiling variant (attention_tile_config) of the causal
prefill / unified kernels against the torch reference.

Interpreter tests (no CUDA) run tiny shapes with small tiles so a query tile has masked window-edge tiles,
whole tiles and diagonal tiles; sm_90 compile checks cover the 8B-shaped variants the bench times (and that
each fits in shared memory); `-m gpu` runs every bench variant at Llama-3.1-8B shapes, and the backend's
memoized work list inside a captured CUDA graph replayed on two different batches.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

from meshserve.kernels import attention_tile_config
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.attention_tile_config import AttentionTileConfig, bench_variants, default_tile_config
from tests.kernels.sm90 import assert_compiles_for_sm90

if importlib.util.find_spec("triton") is not None:
    from test_triton_attention import check, make_case, reference
    from test_triton_unified_attention import pad_case

    from meshserve.kernels.triton_attention import TritonAttentionBackend, prefill_attention
    from meshserve.kernels.triton_unified_attention import unified_attention
    from meshserve.kernels.triton_unified_persistent import build_unified_work, max_work_items

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def work_spec(qsl, seq_lens, block_q, skip_single):
    """The documented list: every (seq, tile) of the sequences with work, by level prefix // BQ + tile
    descending, sequences ascending within a level."""
    items = []
    for s in range(len(seq_lens)):
        q_len = qsl[s + 1] - qsl[s]
        if q_len == 0 or (skip_single and q_len == 1):
            continue
        prefix = seq_lens[s] - q_len
        items += [(prefix // block_q + j, s, j) for j in range(-(-q_len // block_q))]
    return [(s, j) for _, s, j in sorted(items, key=lambda x: (-x[0], x[1]))]


WORK_CASES = [
    # a fresh prompt, decodes, a chunk over a long cached prefix, a one-token chunk, q_len-0 padding
    ([9, 1, 1, 6, 0, 13, 1, 0, 0], [9, 40, 7, 70, 0, 13, 33, 0, 0]),
    # only chunks behind cached prefixes: the levels start above 0
    ([5, 9, 0], [45, 69, 0]),
    # a graph-bound step replayed with decode rows only: nothing to list (with skip_single)
    ([1, 1, 0], [5, 9, 0]),
]


@interp
@pytest.mark.parametrize("skip_single", [True, False])
@pytest.mark.parametrize("case", range(len(WORK_CASES)))
def test_work_list_matches_spec_interp(skip_single, case):
    q_lens, seq_lens = WORK_CASES[case]
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    block_q = 4
    work = build_unified_work(
        torch.tensor(qsl, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
        qsl[-1] + 3,
        block_q,
        skip_single,
    )
    assert work.shape[0] == 1 + max_work_items(qsl[-1] + 3, len(seq_lens), block_q)
    count = int(work[0])
    got = [(int(w) >> 16, int(w) & 0xFFFF) for w in work[1 : 1 + count]]
    assert got == work_spec(qsl, seq_lens, block_q, skip_single)
    if case == 0:
        assert got[0] == (3, 1)  # the chunk behind 64 cached tokens outweighs the fresh prompts' last tiles


# q_lens, seq_lens, H, Hkv, D, block_size, window, (T, S): a chunk behind a cached prefix longer than the window
# (masked window-edge tiles, whole tiles, diagonal tiles), a fresh prompt, decodes, padding
WINDOW_CASE = ([21, 1, 11, 1], [90, 30, 11, 7], 8, 2, 32, 4, 40, (40, 6))
PLAIN_CASE = ([19, 1, 1, 12], [19, 25, 5, 60], 4, 2, 32, 8, None, (40, 6))
# (the default config also runs every case of test_triton_unified_attention; every tile masked: the prefill test)
VARIANTS = [
    AttentionTileConfig(4, 16, diag_mask_only=True),
    AttentionTileConfig(8, 32, diag_mask_only=True, programs_per_sm=2),
    AttentionTileConfig(4, 16, diag_mask_only=True, persistent=False),
]


@interp
@pytest.mark.parametrize(
    ("case", "config"),
    [(WINDOW_CASE, c) for c in VARIANTS] + [(PLAIN_CASE, c) for c in VARIANTS[::2]],
    ids=[f"window-{c.name()}" for c in VARIANTS] + [f"plain-{c.name()}" for c in VARIANTS[::2]],
)
def test_unified_variants_match_reference_interp(case, config):
    q_lens, seq_lens, h, hkv, d, bs, window, (t, s) = case
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, bs, torch.float32, seed=7)
    pq, pmeta = pad_case(query, cache, meta, t, s, seed=1)
    out = torch.full_like(pq, float("nan"))
    unified_attention(
        pq, cache, pmeta.block_tables, pmeta.seq_lens, pmeta.query_start_loc, 0.3, window, out, config=config
    )
    real = sum(q_lens)
    check(out[:real], reference(query, cache, meta, 0.3, window), torch.float32)
    assert (out[real:] == 0).all()


@interp
@pytest.mark.parametrize("diag", [True])
def test_unified_bf16_diag_interp(diag):
    q_lens, seq_lens, h, hkv, d, bs, window, (t, s) = WINDOW_CASE
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, d, bs, torch.bfloat16, seed=8)
    pq, pmeta = pad_case(query, cache, meta, t, s)
    out = torch.full_like(pq, float("nan"))
    config = AttentionTileConfig(4, 16, diag_mask_only=diag)
    unified_attention(
        pq, cache, pmeta.block_tables, pmeta.seq_lens, pmeta.query_start_loc, 0.3, window, out, config=config
    )
    check(out, reference(pq, cache, pmeta, 0.3, window), torch.bfloat16)


@interp
@pytest.mark.parametrize(
    ("window", "config", "head_dim"),
    [
        (12, AttentionTileConfig(4, 8), 32),
        (None, AttentionTileConfig(8, 16, diag_mask_only=False), 32),
        (None, AttentionTileConfig(4, 8), 24),  # whole tiles of a head_dim below its power of two: masked d
    ],
    ids=["window-diag", "allmask", "d24-diag"],
)
def test_prefill_variants_match_reference_interp(window, config, head_dim):
    q_lens, seq_lens = [23, 1, 9], [50, 20, 9]
    query, cache, meta = make_case(q_lens, seq_lens, 4, 2, head_dim, 4, torch.float32, seed=9)
    out = torch.full_like(query, float("nan"))
    prefill_attention(
        query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, meta.max_query_len, 0.3, window,
        out, config=config,
    )  # fmt: skip
    check(out, reference(query, cache, meta, 0.3, window), torch.float32)


@interp
def test_backend_memoizes_work_per_step_interp(monkeypatch):
    """Graph-bound steps build the work list once (meta.step_memo), every layer reuses it."""
    monkeypatch.setattr(attention_tile_config, "LEGACY_DEFAULT", False)
    query, cache, meta = make_case([6, 1, 3], [6, 10, 12], 4, 2, 32, 4, torch.float32, seed=60)
    pq, pmeta = pad_case(query, cache, meta, 16, 4)
    backend = TritonAttentionBackend()
    for _ in range(2):  # two layers
        out = backend.attend(pq, cache, pmeta, 0.2, None)
        check(out[:10], reference(query, cache, meta, 0.2, None), torch.float32)
    assert [k[0] for k in pmeta.step_memo] == ["unified_work"]


def test_legacy_tiles_are_the_launch_before_the_timed_default(monkeypatch):
    # MESHSERVE_PREFILL_TILE_LEGACY=1: the grid launch with every tile masked, for an A/B
    monkeypatch.setattr(attention_tile_config, "LEGACY_DEFAULT", True)
    assert default_tile_config(128, 4, 1 << 30) == AttentionTileConfig(32, 64, 8, 3, False, False)
    assert default_tile_config(128, 4, 8192, long_prefill=True).block_n == 64


def test_default_tiles(monkeypatch):
    monkeypatch.setattr(attention_tile_config, "LEGACY_DEFAULT", False)
    # Llama-3.1-8B (head 128, GQA 4): 128 rows; 128-key steps only for long fp16/bf16 eager prefills
    assert default_tile_config(128, 4, 1 << 30) == AttentionTileConfig(32, 64, 8, 3)
    assert default_tile_config(128, 4, 8192, long_prefill=True).block_n == 128
    assert default_tile_config(128, 4, 8192, elem_size=4, long_prefill=True) == AttentionTileConfig(
        32, 64, 8, 2
    )
    assert default_tile_config(256, 8, 1 << 30).block_q == 8  # 64 rows past head_dim 128
    assert default_tile_config(64, 8, 1).block_q == 2  # at least 16 rows
    names = [c.name() for c in bench_variants(4)]
    assert len(set(names)) == len(names) and names[0] == "grid_bq32_bn64_w8_s3_allmask"


# The bench variants at the 8B shapes, compiled for sm_90 with Triton's ptxas (no GPU) and specialised as the
# launcher specialises a real launch (ints equal to 1 become constants, multiples of 16 and pointers get
# divisibility hints: without them the K/V gathers are scalar and nothing is pipelined). Checks codegen, that
# each fits in shared memory (227 KiB per block on H100/H200), and that the default pipelines its K/V loads
# (cp.async into shared memory) into wgmma dots.
_COMPILE_SM90 = """
import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import CUDABackend
from triton.compiler import ASTSource
from meshserve.kernels.attention_tile_config import bench_variants
from meshserve.kernels.triton_attention import _prefill_attention_kernel
from meshserve.kernels.triton_unified_persistent import _unified_persistent_kernel, _unified_work_kernel

ARGS = dict(q_ptr="*bf16", out_ptr="*bf16", cache_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
            work_ptr="*i32", scale_log2=0.1, k_scale=1.0, v_scale=1.0, num_tokens=1280, num_seqs=256,
            num_kv_heads=8, window=0, stride_qt=4096, stride_qh=128, stride_qd=1, stride_ckv=4096 * 16 * 1024,
            stride_cb=16384, stride_cs=1024, stride_ch=128, stride_cd=1, stride_btb=256, stride_ot=4096,
            stride_oh=128, stride_od=1)


def compile_one(kernel, const, warps, stages):
    names = list(kernel.arg_names)
    sig, attrs = {}, {}
    for i, n in enumerate(names):
        v = const.get(n, ARGS.get(n))
        if n in const:
            sig[n] = "constexpr"
        elif isinstance(v, str):
            sig[n], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[n] = "fp32"
        else:
            ty, spec = native_specialize_impl(CUDABackend, v, False, True, True)
            sig[n] = ty
            if ty == "constexpr":
                const = dict(const, **{n: spec})
            elif spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})


def compile_tile(cfg, fp8=False, window=False):
    const = dict(GROUP=4, GROUP_PAD=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, USE_WINDOW=window,
                 UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=fp8, DIAG_MASK_ONLY=cfg.diag_mask_only,
                 BLOCK_Q=cfg.block_q, BLOCK_N=cfg.block_n)
    if fp8:
        ARGS["cache_ptr"] = "*fp8e4nv"
    kernel = _unified_persistent_kernel if cfg.persistent else _prefill_attention_kernel
    if not cfg.persistent:
        const["SKIP_SINGLE"] = True
    k = compile_one(kernel, const, cfg.num_warps, cfg.num_stages)
    ARGS["cache_ptr"] = "*bf16"
    assert k.metadata.shared <= 232448, (cfg.name(), k.metadata.shared)
    return k


variants = bench_variants(4)
default = compile_tile(variants[3])
ttgir = default.asm["ttgir"]
assert "async_copy_global_to_local" in ttgir and "warp_group_dot" in ttgir
for cfg in variants if ALL else []:
    print(cfg.name(), "smem", compile_tile(cfg).metadata.shared, flush=True)
if ALL:
    compile_tile(variants[3], fp8=True, window=True)
compile_one(_unified_work_kernel, dict(SEQS_PAD=256, BLOCK_Q=32, SKIP_SINGLE=True), 4, 3)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_default_compiles_pipelined_for_sm90_without_gpu():
    assert_compiles_for_sm90("ALL = False\n" + _COMPILE_SM90, timeout_s=900)


@pytest.mark.slow
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_all_bench_variants_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90("ALL = True\n" + _COMPILE_SM90, timeout_s=1800)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu): Llama-3.1-8B shapes
# ----------------------------------------------------------------------------------------------------------
def _issue18_batch(prompts, decodes, ctx, cached=0):
    """prompts fresh prompt lengths (the last one behind `cached` cached tokens), then decode rows at ctx."""
    q_lens = list(prompts) + [1] * decodes
    seq_lens = list(prompts) + [ctx] * decodes
    seq_lens[len(prompts) - 1] += cached
    return q_lens, seq_lens


@gpu
@pytest.mark.parametrize("config", bench_variants(4), ids=lambda c: c.name())
@pytest.mark.parametrize("window", [None, 300])
def test_unified_variants_8b_gpu(config, window):
    q_lens, seq_lens = _issue18_batch([500, 300, 214], 254, 700, cached=600)
    query, cache, meta = make_case(q_lens, seq_lens, 32, 8, 128, 16, torch.bfloat16, device="cuda")
    pq, pmeta = pad_case(query, cache, meta, 1280, 264)  # 257 sequences
    out = torch.full_like(pq, float("nan"))
    unified_attention(
        pq, cache, pmeta.block_tables, pmeta.seq_lens, pmeta.query_start_loc, 128**-0.5, window, out,
        skip_single=True, config=config,
    )  # fmt: skip
    prompt_rows = slice(0, 1014)
    check(out, reference(pq, cache, pmeta, 128**-0.5, window), torch.bfloat16, on_gpu=True, rows=prompt_rows)
    assert (out[sum(q_lens) :] == 0).all()


@gpu
@pytest.mark.parametrize(
    "config", [None, *bench_variants(4)[6:8]], ids=lambda c: c.name() if c else "default"
)
def test_prefill_8k_gpu(config):
    query, cache, meta = make_case([8192], [8192], 32, 8, 128, 16, torch.bfloat16, device="cuda")
    out = torch.empty_like(query)
    prefill_attention(
        query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 8192, 128**-0.5, None, out,
        config=config,
    )  # fmt: skip
    check(out, reference(query, cache, meta, 128**-0.5, None), torch.bfloat16, on_gpu=True)


@gpu
def test_backend_graph_replays_rebuild_work_gpu():
    """The backend's memoized work list inside a captured graph: warm-up and capture on one metadata object
    (as MixedStepGraphs does), then replays of two different batches match the reference."""
    t, s, h, hkv, d, bs, width = 1280, 264, 32, 8, 128, 16, 128  # up to 4 prompts + 254 decode rows
    dev, dtype = "cuda", torch.bfloat16
    cache = torch.randn(2, s * width + 8, bs, hkv, d, device=dev, dtype=dtype)
    q_buf = torch.zeros(t, h, d, device=dev, dtype=dtype)
    tables = torch.zeros(s, width, dtype=torch.int32, device=dev)
    lens = torch.zeros(s, dtype=torch.int32, device=dev)
    qsl = torch.zeros(s + 1, dtype=torch.int32, device=dev)
    slots = torch.full((t,), -1, dtype=torch.int64, device=dev)
    meta = AttentionMetadata(slots, qsl, lens, tables, t, 2048, [0] * (s + 1), [0] * s, graph_bound=True)
    backend = TritonAttentionBackend()
    backend.attend(q_buf, cache, meta, d**-0.5, None)  # warm-up, eager, same meta
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.attend(q_buf, cache, meta, d**-0.5, None)
        out = backend.attend(q_buf, cache, meta, d**-0.5, None)  # a second layer: the memo
    for prompts in ([1014], [400, 300, 200, 114]):
        q_lens, seq_lens = _issue18_batch(prompts, 254, 700)
        query, _, real = make_case(q_lens, seq_lens, h, hkv, d, bs, dtype, device=dev, table_width=width)
        real.block_tables = (
            torch.randperm(cache.shape[1], device=dev)[: len(q_lens) * width].view(-1, width).int()
        )
        pq, pmeta = pad_case(query, cache, real, t, s)
        q_buf.copy_(pq)
        qsl.copy_(pmeta.query_start_loc)
        lens.copy_(pmeta.seq_lens)
        tables.copy_(pmeta.block_tables)
        graph.replay()
        n = sum(q_lens)
        check(out[:n], reference(pq, cache, pmeta, d**-0.5, None)[:n], dtype, on_gpu=True)
        assert (out[n:] == 0).all()
