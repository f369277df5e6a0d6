"""Tensor-parallel linear layers checked without processes: each rank's layer is built with its rank patched
in, and two ranks' column-parallel outputs are put back in the one-device order."""

from __future__ import annotations

import torch

import meshserve.layers.linear as linear_mod


def as_rank(monkeypatch, tp: int, rank: int) -> None:
    """Linear layers built from now on are rank `rank` of `tp`; their all-reduce is the identity (a test adds
    the ranks' row-parallel outputs itself)."""
    monkeypatch.setattr(linear_mod, "get_tp_size", lambda: tp)
    monkeypatch.setattr(linear_mod, "get_tp_rank", lambda: rank)
    monkeypatch.setattr(linear_mod, "tensor_parallel_all_reduce", lambda x: x)


def one_device_columns(kind: str, outs: list[torch.Tensor], q_width: int, kv_width: int) -> torch.Tensor:
    """Two ranks' outputs of a merged ([gate_r, up_r] each) or QKV ([q_r, k_r, v_r] each, of q_width and
    kv_width features per rank) layer, in the one-device layer's order."""
    if kind == "merged":
        halves = [o.chunk(2, dim=-1) for o in outs]
        return torch.cat([halves[0][0], halves[1][0], halves[0][1], halves[1][1]], dim=-1)
    parts = [o.split([q_width, kv_width, kv_width], dim=-1) for o in outs]
    return torch.cat([parts[0][0], parts[1][0], parts[0][1], parts[1][1], parts[0][2], parts[1][2]], dim=-1)
