"""Pipeline-parallel building blocks for models: placeholders for the layers other stages own."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from meshserve.distributed.parallel_state import get_parallel_state
from meshserve.distributed.pipeline import pp_layer_range


class PPMissingLayer(nn.Identity):
    """Stands where a module lives on another pipeline stage, keeping module names (and checkpoint
    names) aligned with the full model."""


@dataclass
class IntermediateTensors:
    """What one pipeline stage hands the next: the hidden states and the residual stream."""

    hidden: torch.Tensor
    residual: torch.Tensor


def copy_stage_input(static: IntermediateTensors, given: IntermediateTensors) -> None:
    """Put a stage's received activations in the first rows of a graph's static input buffers, unless they
    were received there (engine/pipeline_stage.py receives in place when it knows the graph)."""
    n = given.hidden.shape[0]
    for dst, src in ((static.hidden, given.hidden), (static.residual, given.residual)):
        if src.data_ptr() != dst.data_ptr():
            dst[:n].copy_(src)


def pp_stage() -> tuple[bool, bool]:
    """(is first stage, is last stage) of this process."""
    st = get_parallel_state()
    return st.is_first_stage, st.is_last_stage


def make_pipeline_layers(num_layers: int, factory: Callable[[int], nn.Module]) -> tuple[int, int, nn.ModuleList]:
    """The full list of layers with only this stage's [start, end) built; the rest are placeholders."""
    st = get_parallel_state()
    start, end = pp_layer_range(num_layers, st.pp_rank, st.pp_size, st.pp_layer_partition)
    layers = nn.ModuleList([factory(i) if start <= i < end else PPMissingLayer() for i in range(num_layers)])
    return start, end, layers
