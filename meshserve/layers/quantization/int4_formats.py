"""The checkpoint layouts of AWQ and GPTQ INT4 weights, to and from plain [K, N] nibble values.

AWQ (AutoAWQ "gemm" version): qweight [K, N / 8] int32 and qzeros [K / G, N / 8] int32 pack 8 output features
per int32 in the interleaved order AWQ_ORDER (nibble i, bits 4i..4i+3, holds feature 8c + AWQ_ORDER[i]);
scales [K / G, N] fp16; w = (q - z) * s.
GPTQ (AutoGPTQ v1): qweight [K / 8, N] packs 8 input features per int32 in order (nibble i of row r is input
8r + i); qzeros [K / G, N / 8] packs 8 output features in order and stores zero - 1 (v1 checkpoints; the
"gptq_v2" format stores the zero itself); scales [K / G, N]; g_idx [K] is the group of each input feature
(act-order, desc_act, permutes them).
"""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import _as_int32, pack_int4_rows, unpack_int4_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)

__all__ = [
    "AWQ_ORDER",
    "awq_pack",
    "awq_unpack",
    "gptq_pack_cols",
    "gptq_unpack_cols",
    "pack_int4_rows",
    "unpack_int4_rows",
]


def _pack_cols(q: torch.Tensor, order) -> torch.Tensor:
    """q [R, N] values 0..15 -> [R, N / 8] int32, nibble i = column 8c + order[i]."""
    r, n = q.shape
    q = q.to(torch.int64).reshape(r, n // 8, 8)[:, :, list(order)]
    shifts = torch.arange(8, dtype=torch.int64, device=q.device) * 4
    return _as_int32((q << shifts).sum(dim=-1))


def _unpack_cols(packed: torch.Tensor, order) -> torch.Tensor:
    r, c = packed.shape
    shifts = torch.arange(8, dtype=torch.int32, device=packed.device) * 4
    nibbles = (packed[:, :, None] >> shifts) & 0xF  # [R, C, 8], nibble i
    out = torch.empty_like(nibbles)
    out[:, :, list(order)] = nibbles  # nibble i is column order[i]
    return out.reshape(r, c * 8)


def awq_pack(q: torch.Tensor) -> torch.Tensor:
    return _pack_cols(q, AWQ_ORDER)


def awq_unpack(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_cols(packed, AWQ_ORDER)


def gptq_pack_cols(q: torch.Tensor) -> torch.Tensor:
    return _pack_cols(q, range(8))


def gptq_unpack_cols(packed: torch.Tensor) -> torch.Tensor:
    return _unpack_cols(packed, range(8))
