"""The grammar masks' Triton kernel (kernels/triton_token_bitmask.py) equals the torch reference bit for bit
(interpreted on the CPU, compiled on a GPU), and one specialization of it serves every batch size."""

from __future__ import annotations

import pytest
import torch

from meshserve.kernels import triton_token_bitmask
from meshserve.kernels.triton_token_bitmask import apply_token_bitmask
from meshserve.structured.bitmask import ALLOW_ALL, apply_bitmask_reference


def _case(rows: int, vocab: int, width: int, words: int, dtype: torch.dtype, seed: int = 0):
    """Random masks (row 0 allows everything, the last allows nothing) and logits [rows, width]."""
    gen = torch.Generator().manual_seed(seed)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32, generator=gen)
    bitmask[0] = ALLOW_ALL
    if rows > 1:
        bitmask[-1] = 0
    return torch.randn(rows, width, generator=gen).to(dtype), bitmask


# (rows, vocab, logits width, mask words): the last word partly used; logits padded past the mask's tokens;
# a mask wider than the logits; more than one program per row (2048 tokens each)
SHAPES = [(1, 5, 5, 1), (3, 70, 70, 3), (4, 64, 96, 2), (2, 40, 40, 4), (17, 4100, 4100, 129)]


@pytest.mark.parametrize("rows, vocab, width, words", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_equals_reference(rows, vocab, width, words, dtype):
    logits, bitmask = _case(rows, vocab, width, words, dtype)
    expected = logits.clone()
    apply_bitmask_reference(expected, bitmask)
    apply_token_bitmask(logits, bitmask, min(width, words * 32))
    assert torch.equal(logits, expected)
    assert torch.isfinite(logits[0]).all()  # all ones: untouched
    if rows > 1:  # all zeros: every token within the mask's width is -inf, the padding past it untouched
        covered = min(width, words * 32)
        assert torch.isneginf(logits[-1, :covered]).all() and torch.isfinite(logits[-1, covered:]).all()


def test_kernel_refuses_strided_logits_and_other_mask_dtypes():
    logits, bitmask = _case(2, 64, 64, 2, torch.float32)
    with pytest.raises(ValueError, match="unit stride"):
        apply_token_bitmask(logits.t().contiguous().t(), bitmask, 64)
    with pytest.raises(ValueError, match="int32"):
        apply_token_bitmask(logits, bitmask.long(), 64)


def test_one_specialization_for_every_row_count(monkeypatch):
    """Launches for 1 to 70 rows (== 1, multiples of 16, others) of one model's logits key one compiled
    variant as a CUDA Triton would (the start-up warm-up builds it; no batch size compiles inside serving)."""
    from tests.kernels.test_jit_specialization import _Recorder

    recorder = _Recorder(triton_token_bitmask._apply_token_bitmask_kernel)
    monkeypatch.setattr(triton_token_bitmask, "_apply_token_bitmask_kernel", recorder)
    vocab = 49152
    for rows in (1, 2, 3, 16, 17, 32, 64, 70):
        logits, bitmask = _case(rows, vocab, vocab, vocab // 32, torch.bfloat16)
        apply_token_bitmask(logits, bitmask, vocab)
    assert len(recorder.launches) == 8
    assert len({launch for launch in recorder.launches}) == 1, recorder.split_variants()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("rows", [1, 3, 16, 64, 257])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_on_the_device_equals_reference_and_compiles_once(rows, dtype):
    """Llama 3's vocabulary (128,256: the last word partly used) under the logits' and the masks' own
    widths; every row count after the first reuses its compiled kernel."""
    vocab = 128256
    logits, bitmask = _case(rows, vocab, vocab, -(-vocab // 32), dtype, seed=rows)
    expected = logits.clone()
    apply_bitmask_reference(expected, bitmask)
    on_device = logits.cuda()
    apply_token_bitmask(on_device, bitmask.cuda(), vocab)
    assert torch.equal(on_device.cpu(), expected)
    kernel = triton_token_bitmask._apply_token_bitmask_kernel
    compiled = kernel.device_caches[torch.cuda.current_device()][0]
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]  # the logits' type in Triton's cache keys
    assert len([key for key in compiled if name in str(key)]) == 1, list(compiled)
