"""Process-group state seen by the layers: which tensor-parallel rank this process is, out of how many.

Until the distributed launcher lands every process is rank 0 of a group of one, and the collectives
below are identities, so the layers already hold the code path that TP will exercise.
"""

from dataclasses import dataclass

import torch


@dataclass
class TensorParallelState:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup once TP > 1


_TP = TensorParallelState()


def get_tp_rank() -> int:
    return _TP.rank


def get_tp_size() -> int:
    return _TP.size


def tensor_parallel_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the tensor-parallel group (in place where possible)."""
    if _TP.size == 1:
        return x
    torch.distributed.all_reduce(x, group=_TP.group)
    return x


def tensor_parallel_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate x along dim over the tensor-parallel group."""
    if _TP.size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_TP.size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_TP.group)
    return torch.cat(parts, dim=dim)
