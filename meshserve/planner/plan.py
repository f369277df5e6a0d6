"""The planner proper: every layout of the GPUs given, checked for memory, predicted, priced and ranked."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from meshserve.config import ParallelConfig, SchedulerConfig
from meshserve.errors import InvalidArgumentError
from meshserve.planner.cost import Cost, deployment_cost
from meshserve.planner.hardware import GpuSpec
from meshserve.planner.layout import Rejection, enumerate_layouts
from meshserve.planner.memory import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_BATCHED_TOKENS,
    DEFAULT_MAX_NUM_SEQS,
    MemoryBreakdown,
    kv_bytes_per_token,
    kv_dtype_bytes,
    kv_tokens_held,
    memory_per_gpu,
    weight_bytes,
    weight_dtype_bytes,
)
from meshserve.planner.model import ModelSpec
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import Prediction, Workload, predict
from meshserve.planner.pipeline_host import PipelineHost, fitted_host

OBJECTIVES = ("throughput", "latency")


@dataclass(frozen=True)
class PlanRequest:
    """What to plan for. concurrency None means: as many sequences as fit (throughput) or 1 (latency)."""

    model: ModelSpec
    gpu: GpuSpec
    num_gpus: int
    nodes: int = 1
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    concurrency: int | None = None
    weight_dtype: str | None = None  # None: what the checkpoint stores
    kv_dtype: str = "bf16"
    workload: Workload = field(default_factory=Workload)
    objective: str = "throughput"
    max_num_seqs: int = DEFAULT_MAX_NUM_SEQS
    pipeline_depth: int = 0  # steps in flight with PP (the engine's --pipeline-depth; 0: one per stage)
    # PP: the engine core's time per step and round trip (None: the simulator's fit on 2 x H200,
    # pipeline_host.fitted_host), and the engine's --pp-token-handoff (TP 1 only, as the engine)
    pipeline_host: PipelineHost | None = None
    pp_token_handoff: bool = False
    max_batched_tokens: int = DEFAULT_MAX_BATCHED_TOKENS
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION
    enforce_eager: bool = False
    efficiency: float | None = None  # None: the catalog's (calibrated) value
    tp: int | None = None  # pin parts of the layout
    pp: int | None = None
    dp: int | None = None


@dataclass(frozen=True)
class Candidate:
    """A layout that fits, with its memory, predicted speed and cost."""

    layout: Layout
    memory: MemoryBreakdown
    max_concurrency: int  # sequences of the workload's length that fit, all replicas (≤ max_running each)
    max_concurrency_full_len: int  # sequences of max_model_len tokens that fit, all replicas
    prediction: Prediction  # at min(concurrency asked for, max_concurrency); memory is sized for the same
    cost: Cost
    requested_concurrency: int  # what was asked (or the default); above max_concurrency means clamped
    limited_by: str  # what caps max_concurrency: "max_num_seqs" (max_running_per_replica) or "KV memory"

    @property
    def clamped(self) -> bool:
        return self.requested_concurrency > self.prediction.concurrency


@dataclass(frozen=True)
class PlanResult:
    """Ranked candidates (best first), rejections with their reasons, and why the best one won."""

    request: PlanRequest
    weight_dtype: str
    max_model_len: int
    candidates: list[Candidate]
    rejections: list[Rejection]
    reason: str
    hint: str = ""  # when nothing fits: a --max-model-len or GPU count that would

    @property
    def best(self) -> Candidate | None:
        return self.candidates[0] if self.candidates else None

    def to_dict(self) -> dict:
        m, r = self.request.model, self.request
        return {
            "model": {"name": m.name, "total_params": m.total_params, "active_params": m.active_params,
                      "weight_bytes": weight_bytes(m, self.weight_dtype),
                      "kv_bytes_per_token": kv_bytes_per_token(m, r.kv_dtype)},
            "gpu": dataclasses.asdict(r.gpu), "num_gpus": r.num_gpus, "nodes": r.nodes,
            "weight_dtype": self.weight_dtype, "kv_dtype": r.kv_dtype, "max_model_len": self.max_model_len,
            "concurrency": r.concurrency, "objective": r.objective, "workload": dataclasses.asdict(r.workload),
            "candidates": [_candidate_dict(c) for c in self.candidates],
            "rejected": [str(x) for x in self.rejections],
            "chosen": self.best.layout.label if self.best else None,
            "reason": self.reason,
            "hint": self.hint or None,
        }


def _candidate_dict(c: Candidate) -> dict:
    return {"layout": c.layout.label, **dataclasses.asdict(c.layout),
            "memory_per_gpu": {**dataclasses.asdict(c.memory), "total": c.memory.total, "fits": c.memory.fits},
            "max_concurrency": c.max_concurrency, "max_concurrency_full_len": c.max_concurrency_full_len,
            "requested_concurrency": c.requested_concurrency, "clamped": c.clamped, "limited_by": c.limited_by,
            "prediction": dataclasses.asdict(c.prediction), "cost": dataclasses.asdict(c.cost)}


def max_running_per_replica(r: PlanRequest, layout: Layout) -> int:
    """Sequences one replica of layout runs at once: the engine's cap (SchedulerConfig.max_running), max_num_seqs
    per pipeline step in flight (one per stage unless r.pipeline_depth says more)."""
    pc = ParallelConfig(pipeline_parallel_size=layout.pp, pipeline_depth=r.pipeline_depth)
    return SchedulerConfig(max_num_seqs=r.max_num_seqs, pipeline_depth=pc.pipeline_steps_in_flight).max_running


def _validate(r: PlanRequest) -> None:
    if r.num_gpus < 1 or r.nodes < 1:
        raise InvalidArgumentError("--num-gpus and --nodes must be at least 1")
    if r.num_gpus % r.nodes:
        raise InvalidArgumentError(f"{r.num_gpus} GPUs do not split evenly over {r.nodes} nodes")
    if r.num_gpus // r.nodes > r.gpu.gpus_per_node:
        need = math.ceil(r.num_gpus / r.gpu.gpus_per_node)
        raise InvalidArgumentError(f"a {r.gpu.name} node holds at most {r.gpu.gpus_per_node} GPUs; "
                                   f"{r.num_gpus} GPUs need --nodes {need} or more")
    if r.objective not in OBJECTIVES:
        raise InvalidArgumentError(f"objective must be one of {', '.join(OBJECTIVES)}, not {r.objective!r}")
    if r.max_num_seqs < 1 or r.pipeline_depth < 0:
        raise InvalidArgumentError("--max-num-seqs must be at least 1 and --pipeline-depth at least 0")
    if r.concurrency is not None and r.concurrency < 1:
        raise InvalidArgumentError("--concurrency must be at least 1")
    if r.workload.input_len < 1 or r.workload.output_len < 1:
        raise InvalidArgumentError("--input-len and --output-len must be at least 1")
    if not 0 < r.gpu_memory_utilization <= 1:
        raise InvalidArgumentError("--gpu-memory-utilization must be in (0, 1]")
    if r.max_model_len is not None and r.max_model_len < 1:  # 0 would silently mean "the model's"
        raise InvalidArgumentError(f"--max-model-len must be at least 1, got {r.max_model_len}",
                                   param="max_model_len")
    if r.efficiency is not None and not 0 < r.efficiency <= 1:  # NaN too; 0 divided by zero in the prediction
        raise InvalidArgumentError(f"--efficiency is a fraction of the GPU's peak in (0, 1], got {r.efficiency}",
                                   param="efficiency")
    for flag, value in (("--tp", r.tp), ("--pp", r.pp), ("--dp", r.dp)):
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{flag} must be at least 1, got {value}", param=flag[2:])

    weight_dtype_bytes(r.weight_dtype or r.model.checkpoint_dtype)
    kv_dtype_bytes(r.kv_dtype)


def make_plan(r: PlanRequest, hint: bool = True) -> PlanResult:
    """Enumerate, fit, predict and rank every layout of `r.num_gpus` GPUs for `r.model`.

    With `hint`, a plan where nothing fits says what would (a shorter max_model_len, more GPUs).
    """
    _validate(r)
    model, gpu = r.model, r.gpu
    wdtype = r.weight_dtype or model.checkpoint_dtype
    max_len = r.max_model_len or model.max_position_embeddings
    if max_len < 1:
        raise InvalidArgumentError("--max-model-len must be at least 1")
    if r.workload.input_len + r.workload.output_len > max_len:
        raise InvalidArgumentError(f"input_len + output_len = {r.workload.input_len + r.workload.output_len} "
                                   f"exceeds max_model_len {max_len}")
    per_node = r.num_gpus // r.nodes
    # a PP degree the user pins may share a node (what `serve -pp N` runs on one machine); chosen ones go
    # across nodes
    layouts, rejections = enumerate_layouts(model, r.num_gpus, per_node, r.nodes,
                                            pp_in_node=r.pp is not None and r.pp > 1)
    pinned = [(n, v) for n, v in (("tp", r.tp), ("pp", r.pp), ("dp", r.dp)) if v is not None]
    if pinned:
        layouts = [lay for lay in layouts if all(getattr(lay, n) == v for n, v in pinned)]
        rejections = [x for x in rejections if all(getattr(x.layout, n) == v for n, v in pinned)]
    full_seq = kv_tokens_held(model, max_len)
    seq = kv_tokens_held(model, r.workload.input_len + r.workload.output_len)

    def memory(layout: Layout, kv_tokens: int) -> MemoryBreakdown:
        return memory_per_gpu(model, layout, gpu, kv_tokens, weight_dtype=wdtype, kv_dtype=r.kv_dtype,
                              max_batched_tokens=r.max_batched_tokens, max_num_seqs=r.max_num_seqs,
                              gpu_memory_utilization=r.gpu_memory_utilization, enforce_eager=r.enforce_eager)

    candidates: list[Candidate] = []
    too_big: list[MemoryBreakdown] = []
    for layout in layouts:
        if layout.pp > 1 and layout.tp > 1 and r.pp_token_handoff:  # the engine refuses it (EngineArgs.validate)
            rejections.append(Rejection(layout, "--pp-token-handoff needs TP 1"))
            continue
        if layout.pp > 1 and 0 < r.pipeline_depth < layout.pp:  # the engine refuses it (EngineArgs.validate)
            rejections.append(Rejection(layout, f"--pipeline-depth {r.pipeline_depth} is below its {layout.pp} "
                                                "stages (one step per stage at least)"))
            continue
        # A layout runs when every replica holds one max_model_len sequence (the engine's start-up check).
        mem = memory(layout, full_seq)
        if not mem.fits:
            rejections.append(Rejection(layout, "needs " + mem.describe()))
            too_big.append(mem)
            continue
        # PP: each step in flight holds up to max_num_seqs sequences of its own
        cap = max_running_per_replica(r, layout)
        per_replica = min(cap, mem.max_kv_tokens // seq)
        max_conc = per_replica * layout.dp
        limited_by = "max_num_seqs" if per_replica == cap else "KV memory"
        wanted = r.concurrency or (max_conc if r.objective == "throughput" else 1)
        # Never predict beyond what the layout holds (more requests would queue), and size KV for exactly
        # the sequences predicted, so a default and the same explicit concurrency give the same row.
        conc = min(wanted, max_conc)
        mem = memory(layout, max(full_seq, math.ceil(conc / layout.dp) * seq))
        max_full = (mem.max_kv_tokens // full_seq) * layout.dp
        pred = predict(model, layout, gpu, conc, r.workload, weight_dtype=wdtype, kv_dtype=r.kv_dtype,
                       gpus_per_node=per_node, efficiency=r.efficiency, pipeline_depth=r.pipeline_depth,
                       host=(r.pipeline_host or fitted_host()).with_handoff(r.pp_token_handoff),
                       cuda_graphs=not r.enforce_eager)
        candidates.append(Candidate(layout, mem, max_conc, max_full, pred,
                                    deployment_cost(gpu, layout.num_gpus, pred.output_tok_per_s), wanted, limited_by))
    if r.objective == "throughput":
        candidates.sort(key=lambda c: (-c.prediction.output_tok_per_s, c.prediction.itl_s))
    else:
        candidates.sort(key=lambda c: (c.prediction.itl_s, c.prediction.ttft_s, -c.prediction.output_tok_per_s))
    advice = ""
    if not candidates and hint:
        from meshserve.planner.hint import no_fit_hint  # it re-plans through make_plan

        advice = no_fit_hint(r, max_len, too_big)
    return PlanResult(r, wdtype, max_len, candidates, rejections, _reason(r, candidates, rejections), advice)


def _reason(r: PlanRequest, cands: list[Candidate], rejections: list[Rejection]) -> str:
    if not cands:
        fit = [x for x in rejections if x.reason.startswith("needs ")]
        # The most sharded layout comes closest to fitting: the one worth quoting.
        why = str(max(fit, key=lambda x: x.layout.gpus_per_replica)) if fit else (str(rejections[0]) if rejections else "")
        return f"no layout of {r.num_gpus}× {r.gpu.name} fits {r.model.name}" + (f" ({why})" if why else "")
    best, p = cands[0], cands[0].prediction
    mem = f"{best.memory.total / 1e9:.1f} of {best.memory.budget / 1e9:.1f} GB per GPU"
    at = f"{p.concurrency:,} concurrent" + (f" ({best.requested_concurrency:,} asked; its maximum)"
                                            if best.clamped else "")
    if len(cands) == 1:
        return f"{best.layout.label}: the only layout that fits ({mem}); {p.output_tok_per_s:,.0f} output tok/s at {at}"
    runner = cands[1]
    if r.objective == "throughput":
        return (f"{best.layout.label}: highest predicted throughput, {p.output_tok_per_s:,.0f} output tok/s at "
                f"{at} ({mem}); next {runner.layout.label} {runner.prediction.output_tok_per_s:,.0f} tok/s")
    return (f"{best.layout.label}: lowest predicted ITL, {p.itl_s * 1e3:.2f} ms at {at} ({mem}); "
            f"next {runner.layout.label} {runner.prediction.itl_s * 1e3:.2f} ms")
