"""The decode kernel's "words" fp8 path (MESHSERVE_DECODE_FP8_PATH=words, kernels/triton_e4m3_words.py) against
the torch reference and against today's path ("convert"), in the CPU interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py), where the conversion is spelled per byte ("words_bytes": the interpreter runs no inline
PTX; the GPU test tests/gpu/test_gpu_decode_fp8_path.py checks the PTX spelling). Plus the sm_90 compile of
both spellings without a GPU: 16-byte copies, no byte loads of shared memory, the PTX conversion.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.attention_ref import paged_attention_ref
from meshserve.kernels.quant_ref import FP8_DTYPE
from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
    from test_triton_attention import make_case

    from meshserve.kernels.triton_attention import TritonAttentionBackend, _fp8_tile, decode_attention
    from meshserve.kernels.triton_e4m3_words import load_e4m3_tile

    @triton.jit
    def _words_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, D: tl.constexpr, ASM: tl.constexpr):
        """out [ROWS, D] fp16 = load_e4m3_tile of the e4m3 rows src [ROWS, D] (row 1 invalid: zeros)."""
        n = tl.arange(0, ROWS)
        tile = load_e4m3_tile(src_ptr, n.to(tl.int64) * D, n != 1, D, ASM)
        tl.store(out_ptr + n[:, None] * D + tl.arange(0, D)[None, :], tile)


def _all_bytes() -> torch.Tensor:
    """Every e4m3 byte once, in a [8, 32] tile (so each word holds four different ones), then row 1's."""
    b = torch.arange(256, dtype=torch.uint8).view(8, 32)
    return torch.cat([b, b[1:2]]).view(FP8_DTYPE)  # 9 rows: row 8 repeats row 1, which the kernel masks


@interp
def test_words_tile_is_the_e4m3_values_for_every_byte_interp():
    """The word load + per-byte conversion + join/reshape give each byte's .to(fp16) value at its own (row, d):
    the 254 finite values bit for bit (subnormals, +-0 included); masked rows 0. The two NaN bytes (0x7f, 0xff)
    only on the GPU (tests/gpu/test_gpu_decode_fp8_path.py): the interpreter's own e4m3 cast reads them as
    +-480."""
    src = _all_bytes()[:8].contiguous()
    out = torch.full((8, 32), 7.0, dtype=torch.float16)
    _words_kernel[(1,)](src, out, ROWS=8, D=32, ASM=False)
    expect = src.to(torch.float16)
    expect[1] = 0
    nan = expect.isnan()
    assert nan.sum() == 2
    assert torch.equal(out.view(torch.int16)[~nan], expect.view(torch.int16)[~nan])


def _fp8_case(seq_lens, h, hkv, d, bs, seed, q_lens=None):
    query, cache, meta = make_case(q_lens or [1] * len(seq_lens), seq_lens, h, hkv, d, bs, torch.bfloat16,
                                   seed=seed)
    return query, (cache.float() * 2.0).to(FP8_DTYPE), meta  # / k_scale: a spread of e4m3 values, subnormals too


# seq_lens, H, Hkv, D, block_size, window: group 2 and 4; contexts on, below and past tile edges (block_n 16 in
# the tiled test below, the default 128 here: 127 / 128 / 129 / 300)
WORDS_CASES = [
    ([5, 127, 300], 8, 4, 32, 16, None),
    ([128, 129, 17], 8, 2, 64, 8, None),
    ([1, 77, 260], 4, 2, 32, 32, 50),
]


@interp
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", range(len(WORDS_CASES)))
def test_decode_words_path_matches_convert_and_reference_interp(case, splits):
    seq_lens, h, hkv, d, bs, window = WORDS_CASES[case]
    query, cache, meta = _fp8_case(seq_lens, h, hkv, d, bs, seed=40 + case)
    assert _fp8_tile("words", query, cache) == "words_bytes"
    args = (query, cache, meta, d**-0.5, window, 0.5, 0.25)
    convert = TritonAttentionBackend(decode_num_splits=splits).attend(*args)
    words = TritonAttentionBackend(decode_num_splits=splits, fp8_path="words").attend(*args)
    torch.testing.assert_close(words.float(), convert.float(), atol=1e-5, rtol=1e-5)
    auto = TritonAttentionBackend(decode_num_splits=splits, fp8_path="auto").attend(*args)  # the one tile: words
    torch.testing.assert_close(auto.float(), words.float(), atol=0, rtol=0)
    ref = paged_attention_ref(query.float(), cache, meta, d**-0.5, window, 0.5, 0.25)
    torch.testing.assert_close(words.float(), ref, atol=2e-2, rtol=2e-2)


@interp
@pytest.mark.parametrize("splits", [1, 4])
def test_decode_words_small_tiles_and_padding_rows_interp(splits):
    """block_n 16: contexts cross many tile edges (15, 16, 17, 33 tokens); a q_len 0 row (CUDA-graph padding)
    writes nothing and a seq_len 0 row gives zeros, as on the default path."""
    seq_lens = [15, 16, 1, 33, 0, 17]
    query, cache, meta = _fp8_case([15, 16, 1, 33, 1, 17], 8, 2, 32, 8, seed=7, q_lens=[1, 1, 0, 1, 1, 1])
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta.seq_lens_cpu = seq_lens
    outs = {}
    for path in ("convert", "words"):
        out = torch.full((query.shape[0], 8, 32), 3.0, dtype=query.dtype)
        decode_attention(query, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.2, None, out,
                         splits, block_n=16, k_scale=0.5, v_scale=0.25, fp8_path=path)
        outs[path] = out
    torch.testing.assert_close(outs["words"].float(), outs["convert"].float(), atol=1e-5, rtol=1e-5)
    rows = [0, 1, 2, 4]  # token rows of the sequences with a context (row 3 is seq_len 0)
    ref = paged_attention_ref(query.float(), cache, meta, 0.2, None, 0.5, 0.25)
    torch.testing.assert_close(outs["words"][rows].float(), ref[rows], atol=2e-2, rtol=2e-2)
    assert (outs["words"][3] == 0).all()


def test_words_path_only_where_it_fits():
    """convert: a 16-bit cache, the default path, a head_dim that is not the tile's (24 pads to 32), a strided
    d; words otherwise; an unknown path name is an error."""
    q = torch.zeros(1, 4, 32, dtype=torch.bfloat16)
    fp8 = torch.zeros(2, 3, 16, 2, 32, dtype=FP8_DTYPE)
    assert _fp8_tile("convert", q, fp8) == "convert"
    assert _fp8_tile("words", q, fp8.to(torch.bfloat16)) == "convert"
    assert _fp8_tile("words", q, torch.zeros(2, 3, 16, 2, 24, dtype=FP8_DTYPE)) == "convert"
    assert _fp8_tile("words", q, torch.zeros(2, 3, 16, 2, 64, dtype=FP8_DTYPE)[..., ::2]) == "convert"
    assert _fp8_tile("words", q, fp8) in ("words", "words_bytes")
    with pytest.raises(ValueError, match="fp8_path"):
        _fp8_tile("bits", q, fp8)
    with pytest.raises(ValueError, match="fp8_path"):
        TritonAttentionBackend(fp8_path="bits")


def test_auto_reads_words_with_the_one_tile_and_converts_with_the_grid_tile(monkeypatch):
    """fp8_path "auto": the plain decode launch takes words where decode_tile keeps the one tile and convert where
    it takes the grid tile; the fused-prologue launch (the one tile) takes words (its interpreter run:
    test_decode_words_path_matches_convert_and_reference_interp)."""
    import meshserve.kernels.triton_attention as ta

    backend = TritonAttentionBackend(fp8_path="auto")
    assert backend._fp8_path_for(grid_tile=True) == "convert" and backend._fp8_path_for(grid_tile=False) == "words"
    assert TritonAttentionBackend(fp8_path="words")._fp8_path_for(grid_tile=True) == "words"
    seen = []
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: seen.append((kw["block_n"], kw["fp8_path"])))
    query, cache, meta = _fp8_case([40, 70], 8, 2, 32, 16, seed=3)
    backend._decode(query, cache, meta, 0.2, None, torch.empty_like(query), 0.5, 0.25)
    assert seen == [(None, "words")]  # on the CPU: the one tile
    monkeypatch.setattr(ta, "decode_tile", lambda *a: ta.GRID_TILE)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(ta, "_num_sms", lambda index=None: 132)
    backend._decode(query, cache, meta, 0.2, None, torch.empty_like(query), 0.5, 0.25)
    assert seen[-1] == (ta.GRID_TILE[0], "convert")


_COMPILE_SM90 = """
import os, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.triton_attention import _decode_split_kernel

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

# V_T given (a default reaches the called functions as a bare value under ASTSource: both arms compiled)
base = dict(NUM_HEADS=32, GROUP=4, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, UPCAST_DOT=False,
            DOT_PRECISION="tf32", KV_FP8=True, USE_GDC=False, V_T=False)
for window, direct, last, block_n, warps, stages in ((False, True, False, 128, 4, 3), (True, False, False, 128, 4, 3),
                                                     (False, False, True, 128, 4, 3), (False, True, False, 64, 2, 2)):
    const = dict(base, USE_WINDOW=window, DIRECT_OUT=direct, LAST_REDUCES=last, BLOCK_N=block_n)
    words = compile90(dict(const, FP8_TILE="words"), warps, stages)
    ptx, code = words.asm["ptx"], sass(words)
    # the PTX conversion, 16-byte copies of the cache, the fp16 tiles read back with ldmatrix, no byte loads
    assert "cvt.rn.f16x2.e4m3x2" in ptx and "ldmatrix" in ptx, const
    assert "LDGSTS.E.BYPASS.128" in code and "LDS.U8" not in code, const
    if direct and block_n == 128:  # today's path compiles V to one LDS.U8 a byte (so the check above can fail)
        assert "LDS.U8" in sass(compile90(dict(const, FP8_TILE="convert"), warps, stages))
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_words_path_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)
