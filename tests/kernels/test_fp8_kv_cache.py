"""FP8 (e4m3) KV cache: the torch reference (write quantizes, reads dequantize) and the Triton kernels against it.

Without CUDA the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
The interpreter's fp32 -> fp8 cast mis-rounds values that round up across a power of two, so the interpreter
write test uses K/V whose scaled values are exact in e4m3 (no rounding): it checks layout and scaling; the GPU
test compares arbitrary values bit for bit.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

_HAS_CUDA = torch.cuda.is_available()

from meshserve.kernels import kv_layout
from meshserve.kernels.attention_ref import gather_kv_ref, paged_attention_ref, write_kv_ref
from meshserve.kernels.quant_ref import FP8_DTYPE
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.quant_fixtures import e4m3_exact, fp8_kv_cache

_HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not _HAS_TRITON, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if _HAS_TRITON:
    from test_triton_attention import make_case

    from meshserve.kernels.triton_attention import TritonAttentionBackend


@pytest.fixture(params=kv_layout.LAYOUTS)
def v_layout(request, monkeypatch):
    """Each fp8 cache test in both of V's block layouts (MESHSERVE_FP8_V_LAYOUT: kernels/kv_layout.py)."""
    monkeypatch.setenv(kv_layout.ENV, request.param)
    return request.param


def _in_layout(cache: torch.Tensor) -> torch.Tensor:
    """A rows-order fp8 cache's bytes rearranged into the process's V layout (the same logical K and V)."""
    return kv_layout.to_transposed(cache) if kv_layout.v_transposed(cache) else cache


def _fp8_exact(shape, scale, seed):
    g = torch.Generator().manual_seed(seed)
    return e4m3_exact(torch.randn(shape, generator=g) * 4, scale)


def _fp8_kv(cache: torch.Tensor, k_scale: float, v_scale: float) -> torch.Tensor:
    """fp8_kv_cache with K and V under their own scales (so swapping them in a kernel shows)."""
    return torch.stack([fp8_kv_cache(cache[0], k_scale), fp8_kv_cache(cache[1], v_scale)])


def test_reference_write_quantizes_and_read_dequantizes(v_layout):
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(5, 2, 8, generator=g) * 3, torch.randn(5, 2, 8, generator=g) * 1000
    cache = torch.zeros(2, 4, 4, 2, 8, dtype=FP8_DTYPE)
    slots = torch.tensor([0, 3, 4, 9, 15])
    write_kv_ref(k, v, cache, slots, k_scale=0.5, v_scale=2.0)
    # read back in slot order: block table [0, 1, 2, 3] covers slots 0..15
    k_back, v_back = gather_kv_ref(cache, torch.arange(4), 16, 0.5, 2.0)
    assert k_back.dtype == torch.float32
    torch.testing.assert_close(k_back[slots], k, rtol=0.07, atol=0.02)  # e4m3: 3 mantissa bits
    # |v| / 2 beyond 448 saturates instead of becoming NaN
    assert torch.isfinite(v_back).all() and v_back.abs().max() <= 448 * 2.0
    assert (v_back[slots][(v / 2.0).abs() > 448].abs() == 896).all()


def test_reference_attention_matches_the_dequantized_cache(v_layout):
    g = torch.Generator().manual_seed(1)
    from meshserve.kernels.attention_metadata import AttentionMetadata

    cache16 = torch.randn(2, 6, 4, 2, 16, generator=g)
    cache8 = fp8_kv_cache(cache16, 0.25)
    q = torch.randn(3, 4, 16, generator=g)
    meta = AttentionMetadata(
        torch.zeros(3, dtype=torch.int64),
        torch.tensor([0, 2, 3], dtype=torch.int32),
        torch.tensor([7, 9], dtype=torch.int32),
        torch.tensor([[1, 4, 0], [5, 2, 3]], dtype=torch.int32),
        2,
        9,
        [0, 2, 3],
        [7, 9],
    )
    out = paged_attention_ref(q, _in_layout(cache8), meta, 0.25, None, 0.25, 0.25)
    ref = paged_attention_ref(q, cache8.float() * 0.25, meta, 0.25, None)  # rows order: the float cache's
    torch.testing.assert_close(out, ref)


@needs_triton
@interp
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 4.0)])
def test_triton_write_interp(scales, v_layout):
    k_scale, v_scale = scales
    k, v = _fp8_exact((6, 2, 32), k_scale, 1), _fp8_exact((6, 2, 32), v_scale, 2)
    slots = torch.tensor([0, 3, -1, 8, 9, 20])  # -1: CUDA-graph padding writes nothing
    got = torch.zeros(2, 8, 4, 2, 32, dtype=FP8_DTYPE)
    expect = got.clone()
    TritonAttentionBackend().write_kv(k, v, got, slots, k_scale, v_scale)
    keep = slots >= 0
    write_kv_ref(k[keep], v[keep], expect, slots[keep], k_scale, v_scale)
    assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
    # where each V byte lies: token 1 (slot 3: block 0, offset 3), KV head 1, feature 5
    blocks = got[1].view(torch.uint8)
    byte = blocks.view(8, 2, 32, 4)[0, 1, 5, 3] if v_layout == "transposed" else blocks[0, 3, 1, 5]
    assert byte == (v[1, 1, 5] / v_scale).to(FP8_DTYPE).view(torch.uint8)


@needs_triton
@interp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])  # fp16: the fp16-dot tile
@pytest.mark.parametrize("fp8_path", ["convert", "words"])
def test_triton_prefill_and_decode_interp(dtype, fp8_path, v_layout):
    # ([3, 1], [200, 40]): a long prefix, so the prefill kernel's unmasked whole tiles (attend_full_kv_tile) run
    for q_lens, seq_lens, splits in (([5, 1, 9], [5, 30, 20], None), ([1, 1, 1], [5, 70, 33], 3),
                                     ([3, 1], [200, 40], None)):
        query, cache, meta = make_case(q_lens, seq_lens, 4, 2, 32, 8, dtype, seed=len(q_lens) + sum(q_lens))
        cache8 = _in_layout(_fp8_kv(cache, 0.5, 0.125))
        out = TritonAttentionBackend(decode_num_splits=splits, fp8_path=fp8_path).attend(
            query, cache8, meta, 0.2, None, 0.5, 0.125
        )
        ref = paged_attention_ref(query.float(), cache8, meta, 0.2, None, 0.5, 0.125)
        tol = 1e-4 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


_COMPILE_SM90 = """
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_attention import _decode_split_kernel
from meshserve.kernels.triton_ops import _qkv_rope_cache_kernel

def compile90(kernel, ptrs, floats, const, ones):
    names = list(kernel.arg_names)
    const = {**const, **{n: 1 for n in ones}}  # strides of 1 are specialised at launch: so here
    sig = {n: "constexpr" if n in const else ptrs.get(n, "fp32" if n in floats else "i32") for n in names}
    div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride"))]
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})

ptrs = dict(q_ptr="*bf16", cache_ptr="*fp8e4nv", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
            out_ptr="*bf16", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32")
const = dict(NUM_HEADS=32, GROUP=4, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
             USE_WINDOW=False, DIRECT_OUT=True, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=True, USE_GDC=False,
             LAST_REDUCES=False, FP8_TILE="convert")
# V_T: V transposed in each block (kernels/kv_layout.py); every V_T given (a default reaches the called
# functions as a bare value under ASTSource, a runtime branch with both arms compiled)
for v_t in (False, True):
    ptx = compile90(_decode_split_kernel, ptrs, ("scale_log2", "k_scale", "v_scale"), dict(const, V_T=v_t),
                    ("stride_qd", "stride_cd", "stride_od")).asm["ptx"]
    # e4m3 pairs straight to fp16 for the dots; no per-element e4m3 -> fp32 -> * scale -> bf16 round trip
    assert "cvt.rn.f16x2.e4m3x2" in ptx and "cvt.f32.f16" not in ptx and "mma" in ptx, ptx.count("cvt.f32.f16")
    # rows-order V: each byte its own shared-memory load (no transposing 8-bit ldmatrix); transposed V: none,
    # its tile read by ldmatrix like K's
    assert ("ld.shared.b8" not in ptx) == v_t, (v_t, ptx.count("ld.shared.b8"))

# the prefill and unified kernels share the tile: a bf16 query over the fp8 cache (engine warm-up compiles them)
from meshserve.kernels.triton_attention import _prefill_attention_kernel
from meshserve.kernels.triton_unified_attention import _unified_attention_kernel
ptrs = dict(q_ptr="*bf16", cache_ptr="*fp8e4nv", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
            out_ptr="*bf16")
const = dict(GROUP=4, GROUP_PAD=4, BLOCK_Q=32, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64,
             USE_WINDOW=False, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=True, SKIP_SINGLE=True)
for kernel in (_prefill_attention_kernel, _unified_attention_kernel):
    for diag in (False, True):  # True: the unmasked whole tiles (attend_full_kv_tile) too
        for v_t in (False, True):
            ptx = compile90(kernel, ptrs, ("scale_log2", "k_scale", "v_scale"),
                            dict(const, DIAG_MASK_ONLY=diag, V_T=v_t),
                            ("stride_qd", "stride_cd", "stride_od")).asm["ptx"]
            assert "cvt.rn.f16x2.e4m3x2" in ptx and "cvt.f32.f16" not in ptx, (kernel, diag, v_t)

ptrs = dict(qkv_ptr="*bf16", pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", qw_ptr="*bf16", kw_ptr="*bf16",
            q_out_ptr="*bf16", cache_ptr="*fp8e4nv", slot_ptr="*i64")
for heads, norm in (((16, 8), True), ((32, 8), False)):  # Qwen3-0.6B (q/k norms), Llama-3.1-8B
    const = dict(NUM_Q_HEADS=heads[0], NUM_KV_HEADS=heads[1], HALF=64, BLOCK_QH=heads[0], BLOCK_KH=heads[1],
                 BLOCK_HALF=64, BLOCK_SIZE=16, HAS_NORM=norm, KV_FP8=True, USE_GDC=False, V_T=norm)
    ptx = compile90(_qkv_rope_cache_kernel, ptrs, ("eps", "k_scale", "v_scale"), const, ()).asm["ptx"]
    assert "div.rn.f32" in ptx and "cvt.rn.satfinite.e4m3x2.f32" in ptx  # IEEE / scale, saturating RTNE cast
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_fp8_decode_and_prologue_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU: the compiled kernels at production-like shapes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_triton_write_gpu(v_layout):
    g = torch.Generator(device="cuda").manual_seed(0)
    k = torch.randn(300, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16) * 5
    v = torch.randn(300, 8, 128, device="cuda", generator=g, dtype=torch.bfloat16)
    slots = torch.randperm(64 * 16, device="cuda", generator=g)[:300]
    got = torch.zeros(2, 64, 16, 8, 128, dtype=FP8_DTYPE, device="cuda")
    expect = got.clone()
    TritonAttentionBackend().write_kv(k, v, got, slots, 0.05, 0.01)
    # the reference on the CPU: CUDA torch divides by a Python scalar as a multiply by its reciprocal (1 ulp
    # off the IEEE division the kernel and CPU torch do)
    expect = expect.cpu()
    write_kv_ref(k.cpu(), v.cpu(), expect, slots.cpu(), 0.05, 0.01)
    assert torch.equal(got.view(torch.uint8).cpu(), expect.view(torch.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize(
    "q_lens,seq_lens", [([1] * 64, [2048] * 64), ([1], [32768]), ([300, 1, 77], [900, 3000, 77])]
)
@pytest.mark.parametrize("window", [None, 700])  # 700: the window starts inside a cache block (decode and prefill)
def test_triton_attention_gpu(head_dim, q_lens, seq_lens, window, v_layout):
    query, cache, meta = make_case(q_lens, seq_lens, 32, 8, head_dim, 16, torch.bfloat16, device="cuda")
    cache8 = _in_layout(_fp8_kv(cache, 0.02, 0.05))
    out = TritonAttentionBackend().attend(query, cache8, meta, head_dim**-0.5, window, 0.02, 0.05)
    ref = paged_attention_ref(query.float(), cache8, meta, head_dim**-0.5, window, 0.02, 0.05)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("heads", [(32, 8), (16, 8)])  # Llama-3.1-8B, Qwen3-0.6B (head_dim 128)
@pytest.mark.parametrize("fp8_path", ["convert", "words"])
def test_fp8_decode_at_w2_batch_gpu(heads, fp8_path, v_layout):
    """W2's decode step: batch 256, contexts ~800 (100..1500), through the graph path's fixed split count."""
    g = torch.Generator().manual_seed(5)
    seq_lens = torch.randint(100, 1500, (256,), generator=g).tolist()
    query, cache, meta = make_case([1] * 256, seq_lens, *heads, 128, 16, torch.bfloat16, device="cuda")
    query = query * 4  # scores of a few units: softmax far from uniform
    cache8 = _in_layout(_fp8_kv(cache, 0.01, 0.03))
    for splits in (1, 4):
        out = TritonAttentionBackend(decode_num_splits=splits, fp8_path=fp8_path).attend(
            query, cache8, meta, 128**-0.5, None, 0.01, 0.03)
        ref = paged_attention_ref(query.float(), cache8, meta, 128**-0.5, None, 0.01, 0.03)
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
