"""MESHSERVE_DECODE_FP8_PATH=words on the GPU (kernels/triton_e4m3_words.py): the compiled words tile (inline
cvt.rn.f16x2.e4m3x2) gives every e4m3 byte's .to(fp16) bits, NaNs included, and the decode kernel with it
equals today's fp8 path ("convert") over production-like shapes (group 2 and 4, head_dim 64 and 128, one and
several splits, the inline reduce, a window, a padding row) and stays within the reference's tolerance; the
fused prologue's launch with it equals its two-step path and today's fp8 path.
The interpreter tests: tests/kernels/test_decode_fp8_words.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    import triton
    import triton.language as tl

    from meshserve.kernels.triton_e4m3_words import load_e4m3_tile

    @triton.jit
    def _gpu_words_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, D: tl.constexpr):
        n = tl.arange(0, ROWS)
        tile = load_e4m3_tile(src_ptr, n.to(tl.int64) * D, n != 1, D, True)
        tl.store(out_ptr + n[:, None] * D + tl.arange(0, D)[None, :], tile)


def test_words_conversion_is_bit_exact_for_every_byte_gpu():
    src = torch.arange(256, dtype=torch.uint8, device="cuda").view(8, 32).view(torch.float8_e4m3fn)
    out = torch.full((8, 32), 7.0, dtype=torch.float16, device="cuda")
    _gpu_words_kernel[(1,)](src, out, ROWS=8, D=32)
    expect = src.to(torch.float16)
    expect[1] = 0  # the masked row
    nan = expect.isnan()
    assert nan.sum() == 2 and torch.equal(out.isnan(), nan)  # 0x7f and 0xff
    assert torch.equal(out.view(torch.int16)[~nan], expect.view(torch.int16)[~nan])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])  # Qwen3-0.6B (group 2), Llama-3.1-8B (group 4)
@pytest.mark.parametrize("window", [None, 700])
def test_decode_words_equals_convert_gpu(head_dim, heads, window):
    from meshserve.kernels.attention_ref import paged_attention_ref
    from meshserve.kernels.triton_attention import TritonAttentionBackend, _fp8_tile
    from tests.kernels.test_triton_attention import make_case

    h, hkv = heads
    g = torch.Generator().manual_seed(head_dim + h)
    seq_lens = torch.randint(1, 3000, (24,), generator=g).tolist()
    seq_lens[:4] = [1, 127, 128, 2048]  # one token, tile edges, a long one
    q_lens = [1] * 24
    q_lens[5] = 0  # a CUDA-graph padding row: no output
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, head_dim, 16, torch.bfloat16, device="cuda", seed=3)
    cache8 = (cache.float() * 2.0).to(torch.float8_e4m3fn)
    assert _fp8_tile("words", query, cache8) == "words"
    args = (query, cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    ref = paged_attention_ref(query.float(), cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    for splits, inline in ((1, False), (4, False), (4, True), (None, False)):  # direct, reduce, inline, the rule
        convert = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline).attend(*args)
        words = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline,
                                       fp8_path="words").attend(*args)
        same = (words == convert).float().mean().item()
        diff = (words.float() - convert.float()).abs().max().item()
        print(f"head_dim {head_dim} heads {heads} window {window} splits {splits} inline {inline}: "
              f"{same:.4%} of outputs bit-equal to convert, max |diff| {diff:.3g}")
        torch.testing.assert_close(words.float(), convert.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(words.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_decode_words_equals_convert_gpu(heads, splits):
    """The fused prologue's launch (MESHSERVE_DECODE_FUSED_PROLOGUE) with the words path: its output equals the
    two-step path's with the same switch and the fused launch's with today's fp8 path, its cache the same bytes."""
    from tests.kernels.test_triton_decode_fused import run_both

    spec = ([1, 0, 300, 1000, 37, 5000], *heads, 128, 16, None)
    expect, two_step, out, fused, _, _ = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda",
                                                  fp8_path="words")
    convert = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda")[2]
    torch.testing.assert_close(out.float(), expect.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), convert.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(fused.view(torch.uint8), two_step.view(torch.uint8))  # rope alone: K bytes equal too
    assert (out[1] == 0).all()  # the padding row


@pytest.mark.parametrize("batch", [8, 64])  # the one tile (words under auto) and the grid tile (convert)
def test_decode_auto_path_takes_each_tile_its_path_gpu(batch, monkeypatch):
    """MESHSERVE_DECODE_FP8_PATH=auto on the device: a batch below two programs per SM runs the one tile with
    words, batch 64 x 8 KV heads the grid tile with convert; each equals the fixed path it chose, bit for bit."""
    import meshserve.kernels.triton_attention as ta
    from tests.kernels.test_triton_attention import make_case

    query, cache, meta = make_case([1] * batch, [1500] * batch, 16, 8, 128, 16, torch.bfloat16, device="cuda",
                                   seed=batch)
    cache8 = (cache.float() * 2.0).to(torch.float8_e4m3fn)
    args = (query, cache8, meta, 128**-0.5, None, 0.5, 0.25)
    seen = []
    launch = ta.decode_attention
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: (seen.append(kw["fp8_path"]), launch(*a, **kw))[1])
    auto = ta.TritonAttentionBackend(fp8_path="auto").attend(*args)
    grid = batch * 8 >= ta.GRID_TILE_MIN_WAVES * ta._num_sms(0)
    assert seen == ["convert" if grid else "words"]
    fixed = ta.TritonAttentionBackend(fp8_path=seen[0]).attend(*args)
    assert torch.equal(auto, fixed)
