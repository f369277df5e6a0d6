"""The log-sum-exp merge of two partial attention results over disjoint key sets (torch reference of
kernels/triton_lse_merge.py).

Attention of a query over keys A and over keys B, each normalised on its own with its log-sum-exp lse_A,
lse_B (natural log of the sum of exp(score)), combine exactly into attention over A + B:

    lse = log(exp(lse_A) + exp(lse_B)),   out = exp(lse_A - lse) out_A + exp(lse_B - lse) out_B

computed from the larger of the two so nothing overflows. A side that saw no key has lse -inf and weight 0
(a piece of context that lies wholly past a query's causal limit, or holds none of its sequence); a row
with no key on either side stays 0 with lse -inf.

Only the rows of sequences with at least min_query_len new tokens are merged (the others, a mixed step's
decode rows, belong to the absorbed path and stay untouched).
"""

from __future__ import annotations

import itertools

import torch


def merged_rows(query_start_loc_cpu: list[int], min_query_len: int) -> list[int]:
    """The flat rows of the sequences with at least min_query_len new tokens."""
    return [
        r for s, e in itertools.pairwise(query_start_loc_cpu) if e - s >= min_query_len for r in range(s, e)
    ]


def merge_lse_ref(
    out: torch.Tensor,
    out_lse: torch.Tensor,
    a: torch.Tensor,
    a_lse: torch.Tensor,
    b: torch.Tensor,
    b_lse: torch.Tensor,
    query_start_loc_cpu: list[int],
    min_query_len: int = 2,
) -> None:
    """out [T, H, V], out_lse [T, H] (may alias a, a_lse) <- the merge of (a, a_lse) and (b, b_lse), in fp32,
    on the rows of sequences with at least min_query_len new tokens."""
    rows = torch.tensor(merged_rows(query_start_loc_cpu, min_query_len), dtype=torch.int64, device=out.device)
    if rows.numel() == 0:
        return
    la, lb = a_lse[rows].float(), b_lse[rows].float()
    m = torch.maximum(la, lb)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)  # both -inf: weights 0, not nan
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    merged = (a[rows].float() * wa[..., None] + b[rows].float() * wb[..., None]) / torch.where(
        total > 0, total, 1.0
    )[..., None]
    out[rows] = merged.to(out.dtype)
    out_lse[rows] = torch.where(total > 0, m + torch.log(total), float("-inf")).to(out_lse.dtype)
