"""Per-step allowed-token masks: filled on the CPU from each request's matcher, applied to the logits.

A mask is xgrammar's packed bitmask: int32 words, bit t % 32 of word t // 32 set when token t is allowed.
"""

from __future__ import annotations

import torch


def fill_bitmask(matcher, vocab_size: int) -> torch.Tensor:
    """The tokens the matcher allows next, as a [1, ceil(vocab / 32)] int32 bitmask on the CPU."""
    return fill_bitmasks([matcher], vocab_size)


def fill_bitmasks(matchers: list, vocab_size: int) -> torch.Tensor:
    """One bitmask row per matcher ([len(matchers), words], CPU), filled one by one: xgrammar's threaded
    BatchGrammarMatcher was slower on a 2-core machine (10x with its "auto" thread count); to be measured
    on the device before switching."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        matcher.fill_next_token_bitmask(bitmask, i)
    return bitmask


def apply_bitmask(logits: torch.Tensor, bitmasks: list[torch.Tensor], rows: list[int]) -> None:
    """Set the logits of disallowed tokens to -inf, in place, for the given rows (one bitmask each)."""
    import xgrammar as xgr

    packed = torch.cat(bitmasks).to(logits.device, non_blocking=True)
    every_row = len(rows) == logits.shape[0]
    # xgrammar's CPU kernel takes fp32 only; its index list maps a bitmask row to the same logits row, so
    # a subset of rows is masked on a gathered copy (two small kernels) rather than a batch-wide bitmask
    if every_row and (logits.device.type != "cpu" or logits.dtype == torch.float32):
        xgr.apply_token_bitmask_inplace(logits, packed)
        return
    index = torch.tensor(rows, device=logits.device)
    sub = logits.index_select(0, index)
    work = sub.float() if logits.device.type == "cpu" else sub
    xgr.apply_token_bitmask_inplace(work, packed)
    logits.index_copy_(0, index, work.to(logits.dtype))


def bitmask_to_bool(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, vocab] booleans (True = allowed) of a packed bitmask: the plain reference."""
    bits = torch.arange(32, dtype=torch.int32)
    unpacked = (bitmask.unsqueeze(-1) >> bits) & 1  # [rows, words, 32]
    return unpacked.flatten(1)[:, :vocab_size].bool()
