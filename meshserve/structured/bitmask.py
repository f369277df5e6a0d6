"""Per-step allowed-token masks applied to the logits: one packed mask per sampling row, one device op.

A mask is xgrammar's packed bitmask: int32 words, bit t % 32 of word t // 32 set when token t is allowed; a
row of all ones (-1) allows every token (an unconstrained row of a mixed batch). The masks are filled on
the CPU (bitmask_filler.py), copied once and applied to the whole batch's logits in place. Applying needs no
xgrammar (our Triton kernel on a GPU, kernels/triton_token_bitmask.py): the engine core imports it (and
transformers with it, ~1.1 s) only for its first grammar request, not at start-up to warm this path.
"""

from __future__ import annotations

import sys

import torch

ALLOW_ALL = -1  # every bit set


def fill_bitmask(matcher, vocab_size: int) -> torch.Tensor:
    """The tokens the matcher allows next, as a [1, ceil(vocab / 32)] int32 bitmask on the CPU."""
    return fill_bitmasks([matcher], vocab_size)


def fill_bitmasks(matchers: list, vocab_size: int) -> torch.Tensor:
    """One bitmask row per matcher ([len(matchers), words], CPU; None: allow everything), filled one by one:
    the plain reference of BitmaskFiller.fill."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        if matcher is not None:
            matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits [rows, V] of disallowed tokens to -inf, in place: row r by bitmask row r ([rows, words]
    int32, on the host (pinned: the copy does not wait) or on the logits' device). One kernel for the batch:
    ours in Triton on a GPU; on the CPU xgrammar's kernel for fp32 once a grammar has imported xgrammar (never
    imported for this alone), else the torch reference."""
    if bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"{bitmask.shape[0]} bitmask rows for {logits.shape[0]} rows of logits")
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    bitmask = bitmask.to(logits.device, non_blocking=True)
    if logits.device.type == "cuda" and logits.stride(-1) == 1:
        from meshserve.kernels.triton_token_bitmask import apply_token_bitmask

        apply_token_bitmask(logits, bitmask.contiguous(), vocab)
        return
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and "xgrammar" in sys.modules:
        import xgrammar as xgr

        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab)
        return
    apply_bitmask_reference(logits, bitmask)


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """apply_bitmask in plain torch: unpack the bits and fill the disallowed logits with -inf."""
    vocab = min(logits.shape[-1], bitmask.shape[-1] * 32)
    allowed = bitmask_to_bool(bitmask.to(logits.device), vocab)
    logits[:, :vocab].masked_fill_(~allowed, float("-inf"))


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] booleans (True = allowed) of a packed bitmask: the plain reference."""
    bits = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]
    return unpacked.flatten(1)[:, :vocab_size].bool()
