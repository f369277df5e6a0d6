"""Every TP × PP × DP (× EP) layout for a GPU count, and the one-line reason each impossible one is out."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.planner.model import ModelSpec
from meshserve.planner.parallel import Layout


@dataclass(frozen=True)
class Rejection:
    """A layout that cannot run (or does not fit), with why, in one line."""

    layout: Layout
    reason: str

    def __str__(self) -> str:
        return f"{self.layout.label}: {self.reason}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def structural_problem(model: ModelSpec, layout: Layout, gpus_per_node: int, nodes: int,
                       pp_in_node: bool = False) -> str | None:
    """Why `layout` cannot run this model on this cluster shape, ignoring memory; None when it can.

    Pipeline stages go across nodes when the planner chooses (TP inside one); pp_in_node (the user pinned a
    PP degree) lets stages share a node too, as `meshserve serve -pp N` does on one machine."""
    tp, pp, ep = layout.tp, layout.pp, layout.ep
    if tp > gpus_per_node:
        return f"TP={tp} exceeds {gpus_per_node} GPUs per node (TP all-reduces every layer, so it stays in a node)"
    if model.num_heads % tp:
        return f"{model.num_heads} heads not divisible by {tp}"
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        return f"{model.num_kv_heads} KV heads neither divisible by {tp} nor dividing it"
    if model.num_dense_layers and model.intermediate_size % tp:
        return f"intermediate size {model.intermediate_size} not divisible by {tp}"
    if model.is_moe and ep == 1 and model.moe_intermediate_size % tp:
        return f"expert width {model.moe_intermediate_size} not divisible by {tp}"
    if ep > 1 and model.num_experts % ep:
        return f"{model.num_experts} experts not divisible by EP={ep}"
    if pp > model.num_layers:
        return f"PP={pp} exceeds {model.num_layers} layers"
    if pp > nodes and not pp_in_node:
        return f"PP={pp} needs {pp} nodes (pipeline stages go across nodes, TP inside one); {nodes} given"
    return None


def enumerate_layouts(model: ModelSpec, num_gpus: int, gpus_per_node: int,
                      nodes: int = 1, pp_in_node: bool = False) -> tuple[list[Layout], list[Rejection]]:
    """All layouts using exactly `num_gpus` GPUs, split into runnable ones and rejections (memory not checked).

    TP, PP and DP range over divisors whose product is num_gpus; MoE models add an expert-parallel variant
    (EP = TP × DP) of every layout with more than one GPU per stage.
    """
    ok: list[Layout] = []
    rejected: list[Rejection] = []
    for tp in _divisors(num_gpus):
        for pp in _divisors(num_gpus // tp):
            dp = num_gpus // (tp * pp)
            eps = [1] + ([tp * dp] if model.is_moe and tp * dp > 1 else [])
            for ep in eps:
                layout = Layout(tp=tp, pp=pp, dp=dp, ep=ep)
                problem = structural_problem(model, layout, gpus_per_node, nodes, pp_in_node)
                if problem:
                    rejected.append(Rejection(layout, problem))
                else:
                    ok.append(layout)
    return ok, rejected
