"""The decode kernel's "fp8dot" path (MESHSERVE_DECODE_FP8_PATH=fp8dot, kernels/triton_e4m3_dot.py: q and P rounded
to e4m3, e4m3 dots on the cache's tiles) in the CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py),
where it runs as "fp8dot_bytes": V's 4 x 4 byte transpose by shifts instead of PTX, the e4m3 casts rounded in
fp32 (the interpreter's own fp32 -> e4m3 cast mis-rounds where the mantissa carries into the exponent); the GPU
test of the PTX spelling is tests/gpu/test_gpu_decode_fp8_path.py.

Against two references: attention_ref.decode_fp8dot_ref, torch with the same roundings (equal up to fp32
summation order: one bf16 step), and the fp32 reference of the fp8 cache, which fp8dot meets within 5e-2
(abs + rel; the convert path within 1e-2): rounding q (per-row scale amax / 448) and P * 448 to e4m3's 3
mantissa bits costs ~1-3% RMS of the output on these random inputs, q's share the larger (measured with the
torch reference: q alone 1.0-1.8%, P alone 0.75-1.4%). Plus the sm_90 compile without a GPU: e4m3 wgmmas, no
conversion of K or V, V's transpose 4 bytes at a time.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.attention_ref import decode_fp8dot_ref, paged_attention_ref
from meshserve.kernels.quant_ref import FP8_DTYPE
from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
    from test_triton_attention import make_case

    from meshserve.kernels.triton_attention import (
        TritonAttentionBackend,
        _decode_block_n,
        _fp8_tile,
        decode_attention,
    )
    from meshserve.kernels.triton_e4m3_dot import _to_e4m3

    @triton.jit
    def _e4m3_kernel(x_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, _to_e4m3(tl.load(x_ptr + i), False).to(tl.float32))

REF_TOL = 5e-2  # fp8dot against the fp32 reference of the fp8 cache (abs and rel): the e4m3 rounding of q and P


@interp
def test_e4m3_rounding_is_round_to_nearest_even_interp():
    """_to_e4m3's interpreter spelling gives torch's e4m3 cast (round to nearest even, subnormals) saturated at
    448: around every power of two (where the interpreter's own cast goes wrong), ties, subnormals, +-448+."""
    g = torch.Generator().manual_seed(0)
    pow2 = 2.0 ** torch.arange(-9, 9).float()
    x = torch.cat([torch.randn(3000, generator=g) * 40, torch.randn(500, generator=g) * 0.01,
                   pow2 * 0.999, pow2 * 0.97, pow2 * 1.03, pow2 * (1 + 1 / 16), -pow2 * (1 + 3 / 16),
                   torch.tensor([0.0, -0.0, 447.9, 448.0, 460.0, 470.0, -1000.0, 2.0**-10, 3 * 2.0**-11])])
    x = torch.cat([x, torch.zeros(4096 - x.numel())])
    out = torch.empty_like(x)
    _e4m3_kernel[(1,)](x, out, N=4096)
    expect = x.clamp(-448, 448).to(FP8_DTYPE).float()
    assert torch.equal(out, expect), (x[out != expect][:8], out[out != expect][:8], expect[out != expect][:8])


def _fp8_case(seq_lens, h, hkv, d, bs, seed, dtype=torch.bfloat16, q_lens=None):
    query, cache, meta = make_case(q_lens or [1] * len(seq_lens), seq_lens, h, hkv, d, bs, dtype, seed=seed)
    return query, (cache.float() * 2.0).to(FP8_DTYPE), meta  # / k_scale: a spread of e4m3 values, subnormals too


# seq_lens, H, Hkv, D, block_size, window: group 2 and 4; contexts on, below and past the 128-token tiles' edges;
# Qwen3-0.6B's heads (16 / 8, head_dim 128)
FP8DOT_CASES = [
    ([5, 127, 300], 8, 4, 32, 16, None),
    ([128, 129, 17], 8, 2, 64, 8, None),
    ([1, 77, 260], 4, 2, 32, 32, 50),
    ([1, 16, 129, 600], 16, 8, 128, 16, None),
]


@interp
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("case", range(len(FP8DOT_CASES)))
def test_decode_fp8dot_matches_its_torch_reference_interp(case, dtype):
    """One split: the kernel's roundings are decode_fp8dot_ref's (bf16 outputs: one step of the format apart at
    most; fp32: the sums' order only), and the result stays within REF_TOL of the fp32 reference."""
    seq_lens, h, hkv, d, bs, window = FP8DOT_CASES[case]
    query, cache, meta = _fp8_case(seq_lens, h, hkv, d, bs, seed=50 + case, dtype=dtype)
    assert _fp8_tile("fp8dot", query, cache) == "fp8dot_bytes"
    args = (query, cache, meta, d**-0.5, window, 0.5, 0.25)
    out = TritonAttentionBackend(decode_num_splits=1, fp8_path="fp8dot").attend(*args)
    emu = decode_fp8dot_ref(*args, block_n=_decode_block_n(d, query.element_size()))  # the launch's tile
    same = (1e-5, 1e-5) if dtype == torch.float32 else (1e-6, 2.0**-7)
    torch.testing.assert_close(out.float(), emu.float(), atol=same[0], rtol=same[1])
    ref = paged_attention_ref(query.float(), cache, meta, d**-0.5, window, 0.5, 0.25)
    torch.testing.assert_close(out.float(), ref, atol=REF_TOL, rtol=REF_TOL)


@interp
@pytest.mark.parametrize(("splits", "inline"), [(1, False), (4, False), (4, True)])
def test_decode_fp8dot_small_tiles_splits_and_padding_rows_interp(splits, inline):
    """block_n 16 (contexts of 15, 16, 17, 33 tokens), splits reduced by the kernel or inline: within REF_TOL of
    the reference (one split: decode_fp8dot_ref's roundings at 16-token tiles); a q_len 0 row (CUDA-graph
    padding) writes nothing and a seq_len 0 row gives zeros."""
    seq_lens = [15, 16, 1, 33, 0, 17]
    query, cache, meta = _fp8_case([15, 16, 1, 33, 1, 17], 8, 2, 32, 8, seed=7, q_lens=[1, 1, 0, 1, 1, 1])
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta.seq_lens_cpu = seq_lens
    out = torch.full((query.shape[0], 8, 32), 3.0, dtype=query.dtype)
    decode_attention(query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.2, None, out, splits,
                     block_n=16, k_scale=0.5, v_scale=0.25, inline_reduce=inline, fp8_path="fp8dot")
    rows = [0, 1, 2, 4]  # token rows of the sequences with a context (row 3 is seq_len 0)
    ref = paged_attention_ref(query.float(), cache, meta, 0.2, None, 0.5, 0.25)
    torch.testing.assert_close(out[rows].float(), ref[rows], atol=REF_TOL, rtol=REF_TOL)
    if splits == 1:
        emu = decode_fp8dot_ref(query, cache, meta, 0.2, None, 0.5, 0.25, block_n=16)
        torch.testing.assert_close(out[rows].float(), emu[rows].float(), atol=1e-6, rtol=2.0**-7)
    assert (out[3] == 0).all()


def test_fp8dot_only_where_it_fits():
    """convert: a 16-bit cache, a head_dim that is not the tile's (24 pads to 32), a strided d, blocks of 2 tokens
    (V's 4 consecutive tokens share a block); fp8dot otherwise."""
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    fp8 = torch.zeros(2, 3, 16, 2, 32, dtype=FP8_DTYPE)
    assert _fp8_tile("fp8dot", q, fp8.to(torch.bfloat16)) == "convert"
    assert _fp8_tile("fp8dot", q, torch.zeros(2, 3, 16, 2, 24, dtype=FP8_DTYPE)) == "convert"
    assert _fp8_tile("fp8dot", q, torch.zeros(2, 3, 16, 2, 64, dtype=FP8_DTYPE)[..., ::2]) == "convert"
    assert _fp8_tile("fp8dot", q, torch.zeros(2, 3, 2, 2, 32, dtype=FP8_DTYPE)) == "convert"
    assert _fp8_tile("words", q, torch.zeros(2, 3, 2, 2, 32, dtype=FP8_DTYPE)) in ("words", "words_bytes")
    assert _fp8_tile("fp8dot", q, fp8) in ("fp8dot", "fp8dot_bytes")


def test_fp8dot_takes_its_own_grid_tile(monkeypatch):
    """The plain decode launch with fp8dot keeps the one tile for small grids and takes FP8DOT_GRID_TILE (4 warps:
    a wgmma's warpgroup) where the others take GRID_TILE (2 warps)."""
    import meshserve.kernels.triton_attention as ta

    seen = []
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: seen.append(
        (kw["block_n"], kw["num_warps"], kw["num_stages"], kw["fp8_path"])))
    query, cache, meta = _fp8_case([40, 70], 8, 2, 32, 16, seed=3)
    fp8dot, convert = ta.TritonAttentionBackend(fp8_path="fp8dot"), ta.TritonAttentionBackend()
    fp8dot._decode(query, cache, meta, 0.2, None, torch.empty_like(query), 0.5, 0.25)
    assert seen == [(None, 4, None, "fp8dot")]  # on the CPU: the one tile
    monkeypatch.setattr(ta, "decode_tile", lambda *a: ta.GRID_TILE)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(ta, "_num_sms", lambda index=None: 132)
    fp8dot._decode(query, cache, meta, 0.2, None, torch.empty_like(query), 0.5, 0.25)
    convert._decode(query, cache, meta, 0.2, None, torch.empty_like(query), 0.5, 0.25)
    assert seen[1:] == [(*ta.FP8DOT_GRID_TILE, "fp8dot"), (*ta.GRID_TILE, "convert")]


_COMPILE_SM90 = """
import os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_attention import FP8DOT_GRID_TILE, _decode_split_kernel

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
PTRS = dict(q_ptr="*bf16", cache_ptr="*fp8e4nv", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32",
            out_ptr="*bf16", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", ticket_ptr="*i32")
FLOATS = ("scale_log2", "k_scale", "v_scale")
ONES = dict(stride_qd=1, stride_cd=1, stride_od=1)  # unit strides are specialised at launch: so here

def compile90(const, warps, stages):
    kernel = _decode_split_kernel
    names = list(kernel.arg_names)
    const = {**const, **ONES}
    sig = {n: "constexpr" if n in const else PTRS.get(n, "fp32" if n in FLOATS else "i32") for n in names}
    div16 = [n for n in names if n not in const and (n.endswith("_ptr") or n.startswith("stride"))]
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div16})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

def sass(compiled):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        return subprocess.run([f"{BIN}/nvdisasm", "-c", f.name], check=True, capture_output=True, text=True).stdout

base = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=True,
            USE_GDC=False, FP8_TILE="fp8dot")
qwen, llama = dict(NUM_HEADS=16, GROUP=2, ROWS=16), dict(NUM_HEADS=32, GROUP=4, ROWS=16)
for heads, window, direct, last, (block_n, warps, stages) in (
        (qwen, False, True, False, (128, 4, 3)), (llama, True, False, False, (128, 4, 3)),
        (llama, False, False, True, (128, 4, 3)), (qwen, False, True, False, FP8DOT_GRID_TILE)):
    const = dict(base, **heads, USE_WINDOW=window, DIRECT_OUT=direct, LAST_REDUCES=last, BLOCK_N=block_n)
    compiled = compile90(const, warps, stages)
    ptx, code = compiled.asm["ptx"], sass(compiled)
    # both dots e4m3 wgmmas (scores^T: M = BLOCK_N, N = ROWS; out^T: M = D), no e4m3 -> f16 conversion
    assert "wgmma.mma_async.sync.aligned.m64n16k32.f32.e4m3.e4m3" in ptx and "QGMMA" in code, const
    assert "cvt.rn.f16x2.e4m3x2" not in ptx and "HMMA" not in code and "F2FP.F16.E4M3" not in code, const
    # K and V by 16-byte cp.async; V's transpose: 8 PRMT a 16 bytes, into shared memory 4 bytes at a time
    assert "LDGSTS.E.BYPASS.128" in code and "LDS.U8" not in code and "prmt.b32" in ptx, const
    assert code.count("STS.U8") <= block_n * 16 // (32 * warps), const  # P^T's bytes [BLOCK_N, ROWS] only
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_fp8dot_path_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)
