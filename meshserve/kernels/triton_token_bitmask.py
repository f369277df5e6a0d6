"""Grammar masks on the logits in place: one Triton kernel for a whole batch of packed token bitmasks.

apply_token_bitmask(logits, bitmask, vocab) sets logits[r, t] to -inf for every t < vocab whose bit is clear
in bitmask row r (xgrammar's layout: int32 words, bit t % 32 of word t // 32 set = allowed; a row of all ones
allows everything). It does what xgrammar's own Triton kernel does, without importing xgrammar (~1.1 s on a
CPU, transformers included): the engine core builds and warms this kernel at start-up, and imports xgrammar
only with its first grammar request. The row count is the launch grid, not an argument, so one compile serves
every batch size (xgrammar's specialised it: == 1, a multiple of 16, other); the vocabulary and the strides
are the model's, fixed for a run. The plain reference is structured/bitmask.apply_bitmask_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # tokens per program: 64 words of the mask


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, vocab, logits_stride, bitmask_stride,
                                BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * BLOCK
    words = start // 32 + tl.arange(0, BLOCK // 32)
    packed = tl.load(bitmask_ptr + row * bitmask_stride + words, mask=words * 32 < vocab, other=-1)
    # [words, 32] bits, word-major: token start + 32 * w + b is bit b of word w (an arithmetic >>, & 1: bit 31)
    banned = ((packed[:, None] >> tl.arange(0, 32)[None, :]) & 1) == 0
    banned = tl.reshape(banned, [BLOCK])
    cols = start + tl.arange(0, BLOCK)
    tl.store(logits_ptr + row * logits_stride + cols, float("-inf"), mask=banned & (cols < vocab))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, vocab: int) -> None:
    """logits [rows, >= vocab] (any float dtype, unit stride along the vocabulary), bitmask [rows,
    >= ceil(vocab / 32)] int32 on the logits' device: the disallowed logits of the first vocab ids -> -inf."""
    if logits.stride(-1) != 1 or bitmask.stride(-1) != 1:
        raise ValueError("the logits and the bitmask need unit stride along the vocabulary")
    if bitmask.dtype != torch.int32:
        raise ValueError(f"the bitmask is {bitmask.dtype}, not int32")
    rows = logits.shape[0]
    if rows and vocab:
        _apply_token_bitmask_kernel[(rows, triton.cdiv(vocab, BLOCK))](
            logits, bitmask, vocab, logits.stride(0), bitmask.stride(0), BLOCK=BLOCK, num_warps=4)
