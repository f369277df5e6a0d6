"""Expert-parallel token exchange over the tensor-parallel group: dispatch tokens to the ranks that hold their
experts and bring the weighted expert outputs back (combine).

Attention stays tensor-parallel, so every rank of the group holds the step's whole batch. The MoE layer gives
each rank one contiguous slice of it (`token_slices`); that slice is dispatched with all_to_all_single (each
token once to every rank holding at least one of its experts), combined the same way back, and the slices are
all-gathered. Two ways move the tokens:
  all-to-all   variable splits; the counts are exchanged first (one small all-to-all and a host sync), so it
               cannot run inside a CUDA graph
  all-gather   static shapes, for graph capture and for backends without all-to-all: every rank gathers all
               slices' routing, computes its own experts for every token, and one all-reduce sums the parts
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from meshserve.distributed.parallel_state import get_parallel_state


def token_slices(num_tokens: int, ranks: int) -> list[int]:
    """Rows of each rank's slice (as torch.tensor_split: the first num_tokens % ranks get one more)."""
    base, extra = divmod(num_tokens, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def exchange_counts(send_counts: torch.Tensor) -> tuple[list[int], list[int]]:
    """(rows this rank sends each peer, rows each peer sends this rank) as host lists, from the first on the
    device ([ep] int64): one all-to-all and one copy to the host."""
    recv = torch.empty_like(send_counts)
    dist.all_to_all_single(recv, send_counts, group=get_parallel_state().tp_group)
    both = torch.cat([send_counts, recv]).tolist()
    return both[: len(both) // 2], both[len(both) // 2 :]


def all_to_all_rows(x: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
    """Rows of x, grouped by destination rank (send_counts[d] rows for rank d), exchanged: the result holds
    recv_counts[s] rows from each source rank s, in rank order."""
    out = x.new_empty((sum(recv_counts), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=get_parallel_state().tp_group)
    return out


def all_gather_rows(x: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Concatenate each rank's rows (sizes[r] on rank r) over the TP group; slices are padded to the longest
    for the collective and trimmed after."""
    st = get_parallel_state()
    longest = max(sizes)
    padded = x if x.shape[0] == longest else torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))])
    parts = [torch.empty_like(padded) for _ in range(st.tp_size)]
    dist.all_gather(parts, padded.contiguous(), group=st.tp_group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])
