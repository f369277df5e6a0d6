"""The balanced GQA decode kernel (kernels/triton_decode_balanced.py, MESHSERVE_DECODE_BALANCED) against the
torch reference: sequences whole in one program and cut across several (the merge), padding and prompt rows
left alone, 16-bit and fp8 caches in both V layouts; the backend's routing; the sm_90 compile; on the GPU,
W2-like batches against the split kernel."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels import kv_layout
from meshserve.kernels.attention_ref import paged_attention_ref
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.quant_fixtures import fp8_kv_cache

_HAS_CUDA = torch.cuda.is_available()
_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if _HAS_TRITON:
    from test_triton_attention import make_case

    from meshserve.kernels import triton_decode_balanced
    from meshserve.kernels.triton_attention import TritonAttentionBackend
    from meshserve.kernels.triton_decode_balanced import decode_attention_balanced


def _fp8(cache: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    cache8 = torch.stack([fp8_kv_cache(cache[0], k_scale), fp8_kv_cache(cache[1], v_scale)])
    return kv_layout.to_transposed(cache8) if kv_layout.v_transposed(cache8) else cache8


SENTINEL = 7.0  # rows the kernel must not write keep it


def _run(query, cache, meta, num_programs, tile, k_scale=1.0, v_scale=1.0, fp8_path="words"):
    out = torch.full_like(query, SENTINEL)
    return decode_attention_balanced(query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3,
                                     out, tile, 1, k_scale, v_scale, fp8_path, num_programs=num_programs)


def _decode_rows(meta) -> torch.Tensor:
    qsl = meta.query_start_loc.tolist()
    return torch.tensor([qsl[i] for i in range(len(qsl) - 1) if qsl[i + 1] - qsl[i] == 1], dtype=torch.long)


# seq lens with block_n 16: 1 to 9 tiles a sequence; programs 1 (all in one), 2, 3, 7, 40 (more programs than
# tiles: empty ranges); a seq_len-0 decode row (zeros) and the padding row of a CUDA graph (q_len 0)
CASES = [
    ([1, 1, 1, 1], [5, 70, 33, 140], None),
    ([1, 1, 1, 1, 1], [17, 0, 129, 1, 64], None),
    ([1, 0, 1, 1], [40, 0, 90, 16], [0, 1, 1, 2, 3]),
]


@needs_triton
@interp
@pytest.mark.parametrize("num_programs", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_balanced_equals_reference_interp(case, num_programs):
    q_lens, seq_lens, qsl = CASES[case]
    query, cache, meta = make_case(q_lens, seq_lens, 4, 2, 32, 8, torch.float32, seed=case, qsl=qsl)
    out = _run(query, cache, meta, num_programs, (16, 4, 2))
    ref = paged_attention_ref(query, cache, meta, 0.3, None)
    rows = _decode_rows(meta)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    qsl = meta.query_start_loc.tolist()
    for i, n in enumerate(seq_lens):  # a decode row over no keys is zeros, as the split kernel writes
        if n == 0 and qsl[i + 1] - qsl[i] == 1:
            assert torch.equal(out[qsl[i]], torch.zeros_like(out[qsl[i]]))


@needs_triton
@interp
def test_prompt_rows_of_a_mixed_batch_are_left_alone_interp():
    # a prompt chunk (q_len 3) between decodes: its rows are the prefill kernel's, so the sentinel stays
    query, cache, meta = make_case([1, 3, 1, 1], [50, 20, 9, 100], 4, 2, 32, 8, torch.float32, seed=3)
    out = _run(query, cache, meta, 3, (16, 4, 2))
    ref = paged_attention_ref(query, cache, meta, 0.3, None)
    rows = _decode_rows(meta)
    torch.testing.assert_close(out[rows], ref[rows], atol=1e-5, rtol=1e-5)
    assert (out[1:4] == SENTINEL).all()
    from meshserve.kernels.triton_attention import _ticket_workspace

    assert not _ticket_workspace(query.device).any()  # every ticket back at zero for the next launch


@pytest.fixture(params=kv_layout.LAYOUTS)
def v_layout(request, monkeypatch):
    monkeypatch.setenv(kv_layout.ENV, request.param)
    return request.param


@needs_triton
@interp
@pytest.mark.parametrize("fp8_path", ["convert", "words"])
def test_balanced_over_an_fp8_cache_interp(fp8_path, v_layout):
    query, cache, meta = make_case([1] * 5, [30, 100, 3, 64, 47], 4, 2, 32, 8, torch.bfloat16, seed=5)
    cache8 = _fp8(cache.float(), 0.5, 0.125)
    out = _run(query, cache8, meta, 3, (16, 4, 2), 0.5, 0.125, fp8_path)
    ref = paged_attention_ref(query.float(), cache8, meta, 0.3, None, 0.5, 0.125)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@needs_triton
@interp
def test_backend_routes_large_decode_grids_to_it_interp(monkeypatch):
    """TritonAttentionBackend(balanced=N): grids of >= 2 (sequence, KV head) programs an SM (the interpreter
    counts 8 SMs: 16) go to the balanced kernel, smaller ones, windowed ones and heads wider than 128 (not
    measured) to the split kernel; the outputs equal the split kernel's."""
    calls = []
    real = triton_decode_balanced.decode_attention_balanced
    monkeypatch.setattr(triton_decode_balanced, "decode_attention_balanced",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    big = make_case([1] * 8, [5 + 19 * i for i in range(8)], 4, 2, 32, 8, torch.float32, seed=8)  # 16 programs
    small = make_case([1] * 7, [5 + 19 * i for i in range(7)], 4, 2, 32, 8, torch.float32, seed=7)  # 14
    wide = make_case([1] * 8, [5 + 19 * i for i in range(8)], 4, 2, 256, 8, torch.float32, seed=9)  # 16, head 256
    for (query, cache, meta), window, routed in ((big, None, True), (small, None, False), (big, 50, False),
                                                 (wide, None, False)):
        calls.clear()
        got = TritonAttentionBackend(balanced=2).attend(query, cache, meta, 0.3, window)
        want = TritonAttentionBackend().attend(query, cache, meta, 0.3, window)
        assert bool(calls) == routed
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_register_cap_keeps_the_programs_of_an_sm_resident():
    from meshserve.kernels.triton_decode_balanced import max_registers

    # per sub-partition (16,384 registers, a quarter of the SM's warps): 6 x 2 warps = 3 a sub-partition at 168
    assert max_registers(6, 2) == 168
    assert max_registers(5, 2) == 168  # 10 warps: still 3 on some sub-partition (the SM-wide count said 200)
    assert max_registers(8, 2) == 128 and max_registers(3, 4) == 168
    assert max_registers(4, 2) is None and max_registers(1, 4) is None  # 256 a thread: no cap needed


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_decode_balanced import _decode_balanced_kernel

def compile90(kernel, ptrs, floats, const, ones, warps, stages):
    names = list(kernel.arg_names)
    const = {**const, **{n: 1 for n in ones}}
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride"))]
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

# int64 metadata as the engine's graph inputs (cuda_graph.py) and int32 as the eager path's: the walk's
# loop-carried cursors must keep one type either way (the interpreter does not check it)
for cache, fp8_tile, v_t, tile, meta in (("*bf16", "convert", False, (128, 4, 3), "*i64"),
                                         ("*fp8e4nv", "words", True, (64, 2, 2), "*i32"),
                                         ("*fp8e4nv", "convert", False, (64, 2, 2), "*i64")):
    ptrs = dict(q_ptr="*bf16", cache_ptr=cache, bt_ptr="*i32", seq_lens_ptr=meta, qsl_ptr=meta,
                out_ptr="*bf16", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", ticket_ptr="*i32")
    const = dict(NUM_HEADS=32, GROUP=4, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=tile[0],
                 BLOCK_B=256, OVERHEAD_UNITS=1, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=cache != "*bf16",
                 FP8_TILE=fp8_tile, V_T=v_t, USE_GDC=False)
    ptx = compile90(_decode_balanced_kernel, ptrs, ("scale_log2", "k_scale", "v_scale"), const,
                    ("stride_qd", "stride_cd", "stride_od"), tile[1], tile[2]).asm["ptx"]
    assert "mma" in ptx and "atom" in ptx
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_balanced_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU: W2-like batches against the split kernel
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (16, 8)])  # Llama-3.1-8B, Qwen3-0.6B (head_dim 128)
@pytest.mark.parametrize("cache_dtype", ["bf16", "fp8"])
def test_balanced_w2_batch_gpu(heads, cache_dtype, v_layout, monkeypatch):
    calls = []
    real = triton_decode_balanced.decode_attention_balanced
    monkeypatch.setattr(triton_decode_balanced, "decode_attention_balanced",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    g = torch.Generator().manual_seed(0)
    seq_lens = torch.randint(100, 2048, (256,), generator=g).tolist()
    seq_lens[3] = 1  # one tile
    query, cache, meta = make_case([1] * 256, seq_lens, *heads, 128, 16, torch.bfloat16, device="cuda")
    scales = (1.0, 1.0)
    if cache_dtype == "fp8":
        scales = (0.02, 0.05)
        cache = _fp8(cache, *scales)
    ref = paged_attention_ref(query.float(), cache, meta, 128**-0.5, None, *scales)
    for per_sm in (1, 5, 6):
        got = TritonAttentionBackend(balanced=per_sm).attend(query, cache, meta, 128**-0.5, None, *scales)
        torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    assert len(calls) == 3
