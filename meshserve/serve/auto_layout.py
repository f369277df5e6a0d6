"""`meshserve serve --auto`: ask the planner which TP x PP x DP layout fits the visible GPUs, then use it."""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class AutoLayout:
    tp: int
    pp: int
    dp: int
    reason: str


def visible_gpu_names() -> list[str]:
    """Driver names of the visible GPUs; MESHSERVE_AUTO_GPUS="H100-SXM,H100-SXM" simulates a list."""
    simulated = os.environ.get("MESHSERVE_AUTO_GPUS")
    if simulated:
        return [name.strip() for name in simulated.split(",") if name.strip()]
    import torch

    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def choose_auto_layout(model: str, gpu_names: list[str], nodes: int = 1, max_model_len: int | None = None,
                       objective: str = "throughput") -> AutoLayout:
    """The planner's best layout for `model` (preset, HF folder or config.json) on these GPUs."""
    from meshserve.planner.auto import choose_layout_for_visible_gpus

    choice = choose_layout_for_visible_gpus(model, gpu_names, nodes=nodes, max_model_len=max_model_len,
                                            objective=objective)
    layout = choice.layout
    return AutoLayout(layout.tp, layout.pp, layout.dp, choice.reason)


def apply_auto_layout(ns: argparse.Namespace) -> AutoLayout:
    """Set ns's parallel sizes from the planner and report the choice on stdout."""
    from meshserve.models.embedded import DEFAULT_MODEL_NAME

    model = ns.model or "smollm2-135m"
    choice = choose_auto_layout(model, visible_gpu_names(), nodes=ns.nnodes, max_model_len=ns.max_model_len)
    ns.tensor_parallel_size, ns.pipeline_parallel_size = choice.tp, choice.pp
    if hasattr(ns, "data_parallel_size"):
        ns.data_parallel_size = choice.dp
    elif choice.dp > 1:
        logger.warning("the planner suggests %d data-parallel replicas; serving one", choice.dp)
    print(f"meshserve: --auto chose TP={choice.tp} x PP={choice.pp} x DP={choice.dp} for "
          f"{ns.model or DEFAULT_MODEL_NAME}: {choice.reason}", flush=True)
    return choice
