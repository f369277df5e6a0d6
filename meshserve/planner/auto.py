"""`serve --auto`: from the GPUs the process can see to the layout to launch, with a one-line reason."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import GpuSpec, get_gpu, load_catalog
from meshserve.planner.model import ModelSpec, load_model
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import Workload
from meshserve.planner.plan import PlanRequest, PlanResult, make_plan


@dataclass(frozen=True)
class AutoChoice:
    """The layout serve should launch, why, and the full plan behind it."""

    gpu: GpuSpec
    num_gpus: int
    layout: Layout
    reason: str
    plan: PlanResult


def identify_gpus(gpu_names: list[str], catalog: dict[str, GpuSpec]) -> GpuSpec:
    """The one catalog entry all visible GPUs map to (driver names such as 'NVIDIA H100 80GB HBM3')."""
    if not gpu_names:
        raise InvalidArgumentError("no GPUs visible; --auto needs at least one")
    specs = {get_gpu(name, catalog).name for name in gpu_names}
    if len(specs) > 1:
        raise InvalidArgumentError(f"mixed GPU types visible ({', '.join(sorted(specs))}); "
                                   "set CUDA_VISIBLE_DEVICES to one type")
    return get_gpu(gpu_names[0], catalog)


def choose_layout_for_visible_gpus(model: ModelSpec | str, gpu_names: list[str], *, nodes: int = 1,
                                   max_model_len: int | None = None, concurrency: int | None = None,
                                   weight_dtype: str | None = None, kv_dtype: str = "bf16",
                                   objective: str = "throughput", workload: Workload | None = None,
                                   catalog: dict[str, GpuSpec] | None = None) -> AutoChoice:
    """Plan for every visible GPU (× nodes) and return the best layout; raises when nothing fits."""
    catalog = catalog if catalog is not None else load_catalog()
    spec = model if isinstance(model, ModelSpec) else load_model(model)
    gpu = identify_gpus(gpu_names, catalog)
    num_gpus = len(gpu_names) * nodes
    result = make_plan(PlanRequest(model=spec, gpu=gpu, num_gpus=num_gpus, nodes=nodes,
                                   max_model_len=max_model_len, concurrency=concurrency,
                                   weight_dtype=weight_dtype, kv_dtype=kv_dtype, objective=objective,
                                   workload=workload or Workload()))
    if result.best is None:
        raise InvalidArgumentError(result.reason + (f"; {result.hint}" if result.hint else ""))
    # serve --auto launches TP x PP x DP without --enable-expert-parallel: an EP row (DP x EP is planned only)
    # would start as its plain layout, which holds every expert per replica and may not fit at all
    runnable = [c for c in result.candidates if c.layout.ep == 1]
    if not runnable:
        raise InvalidArgumentError(f"{result.reason}; only expert-parallel layouts fit, which --auto does not "
                                   "launch (serve with --enable-expert-parallel and --tensor-parallel-size)")
    chosen, reason = runnable[0], result.reason
    if chosen is not result.best:
        p = chosen.prediction
        reason = (f"{chosen.layout.label}: the best layout without expert parallelism (--auto does not launch "
                  f"EP), {p.output_tok_per_s:,.0f} output tok/s, ITL {p.itl_s * 1e3:.2f} ms at "
                  f"{p.concurrency:,} concurrent; the plan's best, {result.best.layout.label}, needs EP")
    return AutoChoice(gpu, num_gpus, chosen.layout, f"{num_gpus}× {gpu.name}: {reason}", result)
