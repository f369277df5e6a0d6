"""How long a simulated step takes: the engine's own step-time model, with weights fitted to a measured trace.

The engine predicts each step's device time from its shape (new tokens, sequences, KV tokens read) with
StepTimeModel (meshserve/engine/step_time.py): data-sheet times for the weights/FLOPs and the KV reads, a
constant, and a fixed extra cost for a step that carries prefill (it runs outside CUDA graphs). Online it fits
those four weights to the steps it measures; here they are fitted once, offline, to a `--step-trace` file of a
real run or to a decode curve (calibration.toml holds the result and where it came from), and reused for the GPU
and model being simulated, whose data-sheet rates come from the planner's catalog. A GPU kind with fits of its own
(default_by_gpu: the H100's) takes them; the others take the H200's, which priced W2 on a real H100 12-13% slow
(a fit on one GPU cannot tell the costs that scale with bandwidth from those that do not: PLANNER.md). A model with a step trace of its own has its
own fit, which `--calibration default` takes for it (calibration_for: Qwen3-0.6B, whose fixed costs per step the
8B's fit hid under its 16 GB of weight reads).

Tensor parallelism (tp > 1) divides the fit's weight/FLOP and KV terms by tp (each GPU holds 1/tp of the weights
and KV heads) and adds what the TP=1 fit cannot know about (TpCosts, the calibration's `tp` table): the planner's
ring all-reduces (two per layer, latency + bytes over the catalog's NVLink) and the per-layer costs that do not
shrink with tp -- small kernels (norms, rotary, attention launch, SiLU) that the TP=1 fit folded into its weight
and KV factors, so that dividing those terms by tp wrongly divides them too. At tp = 1 the term is 0.0.

Beyond the fit (calibration.toml's tables for every fit, measured or fitted on our H200 runs): a narrower weight
or cache dtype takes a measured fraction of bf16's term (DtypeTime), not its bytes' share; a MoE step reads the
experts its tokens route to (moe_steps.py) plus each MoE layer's routing launch (MoeCosts); MLA prices its KV term
at its kernel's time per byte and adds each layer's own launches (MlaCosts). Those two tables are the build now;
a fit of an older build's runs may carry its own ([NAME.moe], [NAME.mla]: load_moe_costs(name)), and
`--layer-cost moe|mla` fits them to a build's W1 (fit_layer_cost). Dense bf16 models are priced as before, to
the bit.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import sys
import tarfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from meshserve.bench.workloads import W1_NEW_TOKENS
from meshserve.engine.step_time import DeviceRates, StepShape, StepTimeModel
from meshserve.errors import InvalidArgumentError
from meshserve.planner.hardware import GpuSpec
from meshserve.planner.memory import UNQUANTIZED_BYTES, stage_shard
from meshserve.planner.model import ModelSpec
from meshserve.planner.parallel import Layout
from meshserve.planner.perf import ACT_BYTES, allreduce_s
from meshserve.simulator.eager_steps import EagerStepCosts, EagerStepModel, eager_costs_of
from meshserve.simulator.moe_steps import MoeEagerStepModel, MoeStepModel

CALIBRATION_FILE = Path(__file__).with_name("calibration.toml")


@dataclass(frozen=True)
class StepWeights:
    """The four weights of StepTimeModel: constant (ms), dense and KV factors, mixed-step cost (ms); and, beyond
    the engine's model, seq_us: a cost per sequence of the step (us) that a fit may have apart from its KV term
    (fit_curve_weights; 0 for the step-trace fits, whose KV factor holds it), and one_row_dense_factor: the dense
    factor of a one-token step where it differs from the others' (None: the same). One row runs the engine's
    Triton GEMVs, more rows cuBLAS GEMMs, which read the weights at another rate (fit_one_row)."""

    constant_ms: float
    dense_factor: float
    kv_factor: float
    mixed_ms: float
    seq_us: float = 0.0
    one_row_dense_factor: float | None = None

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.constant_ms, self.dense_factor, self.kv_factor, self.mixed_ms)


# the tables a fit may take from another (its `carries` key) when it has none of its own: what its trace could not
# measure (a one-GPU trace knows nothing of TP or of the pipeline's host)
CARRIED_TABLES = ("tp", "pipeline", "eager", "step_noise")


def calibration_sections() -> dict:
    return tomllib.loads(CALIBRATION_FILE.read_text())


def calibration_entry(name: str = "default") -> dict:
    """A fit of calibration.toml by name, an alias such as "default" followed, with the CARRIED_TABLES of the fit
    its `carries` key names where it has none of its own."""
    sections = calibration_sections()
    entry = sections.get(name)
    if isinstance(entry, str):  # an alias ("default"): the name of the fit it stands for
        entry = sections.get(entry)
    if not isinstance(entry, dict) or "constant_ms" not in entry:
        fits = [k for k, v in sections.items() if isinstance(v, str) or "constant_ms" in v]
        raise InvalidArgumentError(f"no calibration {name!r}; calibration.toml has {', '.join(fits)}",
                                   param="calibration")
    donor = calibration_entry(entry["carries"]) if entry.get("carries") else {}  # with what it carries in turn
    return {**{k: donor[k] for k in CARRIED_TABLES if k in donor}, **entry}


def calibration_for(name: str, model: str, gpu: str | None = None) -> str:
    """The fit a simulation of `model` on `gpu` takes for --calibration `name`: "default" is the GPU's own fit of
    the model, or of any model ("*"), where calibration.toml's default_by_gpu lists one (fits measured on that
    GPU kind); else the model's own fit where default_by_model lists one (a step trace of that model); else the
    default alias (carried to the GPU by the data sheet)."""
    if name != "default":
        return name
    sections = calibration_sections()
    by_gpu = sections.get("default_by_gpu", {}).get(gpu or "", {})
    fit = by_gpu.get(model.lower()) or by_gpu.get("*")
    return fit or sections.get("default_by_model", {}).get(model.lower(), name)


def load_calibration(name: str = "default") -> StepWeights:
    """Weights from a section of calibration.toml (a fit of our own measurements: step traces, or decode curves
    with fit_curve_weights), or from the section that an alias such as "default" names."""
    entry = calibration_entry(name)
    return StepWeights(entry["constant_ms"], entry["dense_factor"], entry["kv_factor"], entry["mixed_ms"],
                       entry.get("seq_us", 0.0), entry.get("one_row_dense_factor"))


@dataclass(frozen=True)
class TpCosts:
    """Per layer, what a step at tp > 1 pays beyond its TP=1 terms divided by tp: layer_us fixed and layer_seq_us
    per sequence in the step; a fraction (1 - 1/tp) of it, the part the divided terms dropped."""

    layer_us: float = 0.0
    layer_seq_us: float = 0.0


def load_eager_costs(name: str = "default") -> EagerStepCosts | None:
    """The `eager` table of a calibration.toml section (eager_steps.py; None: eager steps priced as the fit)."""
    return eager_costs_of(calibration_entry(name))


def load_tp_costs(name: str = "default") -> TpCosts:
    """The `tp` table of a calibration.toml section (none: no cost beyond the all-reduces)."""
    table = calibration_entry(name).get("tp", {})
    return TpCosts(table.get("layer_us", 0.0), table.get("layer_seq_us", 0.0))


@dataclass(frozen=True)
class DtypeTime:
    """A narrower dtype's step terms as a fraction of the same term in bf16 at the same tokens, measured
    (calibration.toml's top-level [dtype_time]): the engine's kernels do not turn half the bytes into half the
    time (an fp8 cache's decode attention takes 0.76 of bf16's). weights: the weight/FLOP term by weight dtype;
    kv: the KV term by cache dtype. A dtype missing from a table is priced by its bytes (the data sheet)."""

    weights: dict
    kv: dict
    flops: dict  # the FLOP rate's factor over bf16's data sheet, by weight dtype

    def flops_per_s(self, dtype: str, gpu: GpuSpec) -> float:
        """The FLOP term's rate: bf16's data-sheet rate times the table's factor for the dtype where it has one
        (fp8's is fitted to one W2 run: calibration.toml), else the data sheet's rate for the dtype."""
        if dtype in self.flops:
            return gpu.flops_per_s("bf16") * self.flops[dtype]
        return gpu.flops_per_s(dtype)

    def weight_bytes(self, dtype: str, bf16_bytes: float, dtype_bytes: float) -> float:
        """The bytes the weight term reads at the data sheet's bandwidth for the measured time."""
        return bf16_bytes * self.weights[dtype] if dtype in self.weights else dtype_bytes

    def kv_bytes_per_token(self, dtype: str, bf16_bytes: float, dtype_bytes: float) -> float:
        return bf16_bytes * self.kv[dtype] if dtype in self.kv else dtype_bytes


def load_dtype_time() -> DtypeTime:
    """calibration.toml's [dtype_time] (none: every dtype priced by its bytes)."""
    table = calibration_sections().get("dtype_time", {})
    return DtypeTime(dict(table.get("weights", {})), dict(table.get("kv", {})), dict(table.get("flops", {})))


@dataclass(frozen=True)
class MoeCosts:
    """What a MoE layer costs beyond its expert bytes (calibration.toml [moe]): route_us, its routing and
    alignment launch per step; floor_us, the least time its expert read takes (moe_steps.MoeDense)."""

    route_us: float = 0.0
    floor_us: float = 0.0


def _costs_table(cls, section: str, name: str | None = None):
    """A top-level table of calibration.toml as `cls` (a dataclass of floats): its fields the table has, the
    defaults for the rest (an absent table: all defaults); with a fit's name, that fit's own table of the same
    name ([NAME.moe]) over it: the costs of the build whose runs that fit was measured on (the top-level table
    is the build now)."""
    table = dict(calibration_sections().get(section, {}))
    if name is not None:
        table.update(calibration_entry(name).get(section, {}))
    return cls(**{f.name: float(table[f.name]) for f in dataclasses.fields(cls) if f.name in table})


def load_moe_costs(name: str | None = None) -> MoeCosts:
    """calibration.toml's [moe], with the named fit's own [NAME.moe] over it where it has one."""
    return _costs_table(MoeCosts, "moe", name)


@dataclass(frozen=True)
class MlaCosts:
    """What multi-head latent attention costs beyond the fit's terms (calibration.toml [mla]): kv_time, its KV
    term's time per byte over GQA's; layer_us, each layer's own launches per step."""

    kv_time: float = 1.0
    layer_us: float = 0.0


def load_mla_costs(name: str | None = None) -> MlaCosts:
    """calibration.toml's [mla], with the named fit's own [NAME.mla] over it where it has one."""
    return _costs_table(MlaCosts, "mla", name)


@dataclass(frozen=True)
class FusedNormSaving:
    """What one TP all-reduce saves when the residual add and the next RMSNorm run inside it (the fused kernel,
    MESHSERVE_TP_FUSED_NORM=pull|push): measured microseconds of (one-shot all-reduce, then the Triton norm)
    minus (the fused kernel) at message sizes kib, read linearly between them and held past the last; nothing
    past max_kib, where the engine takes the unfused path (the kernel's buffer)."""

    kib: tuple[float, ...]
    saving_us: tuple[float, ...]
    max_kib: float

    def saving_s(self, nbytes: float) -> float:
        kib = nbytes / 1024
        if kib > self.max_kib:
            return 0.0
        return float(np.interp(kib, self.kib, self.saving_us)) * 1e-6


def load_fused_norm(variant: str, name: str = "default") -> FusedNormSaving:
    """The `tp.fused_norm_<variant>` table of a calibration.toml section (variant: pull or push)."""
    table = calibration_entry(name).get("tp", {}).get(f"fused_norm_{variant}")
    if table is None:
        raise InvalidArgumentError(f"calibration {name!r} has no tp.fused_norm_{variant} table", param="tp_fused_norm")
    return FusedNormSaving(tuple(table["kib"]), tuple(table["saving_us"]), table["max_kib"])


def stage_read_bytes(model: ModelSpec, tp: int, pp: int, weight_dtype: str = "bf16", kv_dtype: str = "bf16",
                     layer_partition: Sequence[int] | None = None, ep: int = 1) -> list[float]:
    """Weight bytes each pipeline stage's step reads, priced on the TP=1 fit's scale: the first stage's embedding
    is a gather of the step's rows, not a read of the table, but the fit (one GPU, every weight counted) priced
    the whole model's bytes, so the stages' reads are scaled to sum to it. Without this the first stage carried
    the whole embedding's read and an even split looked balanced where the last stage (the head) is heavier,
    which --pp-layer-partition 17,15 corrects on the 8B."""
    layout = Layout(tp=tp, pp=pp, ep=ep)
    shards = [stage_shard(model, layout, s, weight_dtype, kv_dtype, layer_partition) for s in range(pp)]
    reads = [sh.weight_bytes for sh in shards]
    reads[0] -= model.embedding_params / tp * UNQUANTIZED_BYTES
    whole = stage_shard(model, Layout(tp=tp, ep=ep), 0, weight_dtype, kv_dtype).weight_bytes
    scale = whole / sum(reads)
    return [r * scale for r in reads]


def prior_weights(efficiency: float, overhead_ms: float = 1.0) -> StepWeights:
    """The engine's own starting point before it has measured a step: data sheet at `efficiency`."""
    return StepWeights(overhead_ms, 1.0 / efficiency, 1.0 / efficiency, 0.0)


class StepCost:
    """Seconds of one step of one replica (a TP group of `tp` GPUs) from its StepShape; with pp > 1, of one
    pipeline stage's pass (`stage`: its slice of the layers, the embedding on the first, the head on the last).

    A stage keeps the whole constant (each stage launches and syncs its own step) and the share of the
    mixed-step cost its layers carry (the prompt rows' work outside the weights and KV terms). ep = tp spreads a
    MoE model's experts whole over the TP ranks (the engine's --enable-expert-parallel).
    tp_costs: the per-layer costs at tp > 1 (default: the default calibration's). eager: what a mixed step past
    the mixed-step graphs costs beyond the fit (eager_steps.py; measured on one GPU, so not split into stages:
    none with pp > 1); its device term is in the model the policy predicts with, its host term in host_s only.
    moe_costs / mla_costs: a MoE / MLA layer's own costs (default: calibration.toml's [moe] / [mla]; a fit's own
    tables by load_moe_costs(name) / load_mla_costs(name))."""

    def __init__(self, model: ModelSpec, gpu: GpuSpec, tp: int = 1, weights: StepWeights | None = None,
                 weight_dtype: str = "bf16", kv_dtype: str = "bf16", pp: int = 1, stage: int = 0,
                 tp_costs: TpCosts | None = None, layer_partition: Sequence[int] | None = None,
                 fused_norm: str = "", eager: EagerStepCosts | None = None, ep: int = 1,
                 moe_costs: MoeCosts | None = None, mla_costs: MlaCosts | None = None):
        layout = Layout(tp=tp, pp=pp, ep=ep)  # ep = tp: whole experts over the TP ranks (SimConfig.layout)
        shard = stage_shard(model, layout, stage, weight_dtype, kv_dtype, layer_partition)
        wide = stage_shard(model, layout, stage, "bf16", "bf16", layer_partition)
        self.weights = weights or load_calibration()
        weight_bytes, bf16_bytes = shard.weight_bytes, wide.weight_bytes
        if pp > 1:
            share = shard.num_layers / model.num_layers
            self.weights = StepWeights(self.weights.constant_ms, self.weights.dense_factor, self.weights.kv_factor,
                                       self.weights.mixed_ms * share, self.weights.seq_us * share,
                                       self.weights.one_row_dense_factor)
            weight_bytes = stage_read_bytes(model, tp, pp, weight_dtype, kv_dtype, layer_partition, ep)[stage]
            bf16_bytes = stage_read_bytes(model, tp, pp, "bf16", "bf16", layer_partition, ep)[stage]
        # a narrower dtype: its measured time (DtypeTime), as the bytes the fit's bandwidth term would read
        dtype_time = load_dtype_time()
        params = bf16_bytes / 2  # the FLOPs follow the parameters, not the bytes they are stored in
        weight_bytes = dtype_time.weight_bytes(weight_dtype, bf16_bytes, weight_bytes)
        kv_bytes = dtype_time.kv_bytes_per_token(kv_dtype, wide.kv_bytes_per_token, shard.kv_bytes_per_token)
        # the MoE / MLA layers' own costs (None: calibration.toml's top-level tables, the build now; a model
        # without such layers: none)
        self.moe_costs = (moe_costs or load_moe_costs()) if model.is_moe else MoeCosts()
        self.mla_costs = (mla_costs or load_mla_costs()) if model.is_mla else MlaCosts()
        mla, moe_costs = self.mla_costs, self.moe_costs
        kv_bytes *= mla.kv_time  # the latent cache's decode kernel reads slower than GQA's (calibration.toml [mla])
        moe = {}
        if model.is_moe:  # a step reads the experts its tokens route to; a token multiplies by its top-k
            share = shard.num_moe_layers * shard.experts_per_gpu * shard.expert_slice_bytes / shard.weight_bytes
            wide_share = wide.num_moe_layers * wide.experts_per_gpu * wide.expert_slice_bytes / wide.weight_bytes
            params *= 1.0 - wide_share * (1.0 - model.experts_per_token / model.num_experts)
            moe = {"expert_share": share, "num_moe_layers": shard.num_moe_layers, "num_experts": model.num_experts,
                   "top_k": model.experts_per_token, "floor_s": moe_costs.floor_us * 1e-6}
        self.eager = eager if pp == 1 else None
        rates = DeviceRates(gpu.hbm_bytes_per_s, dtype_time.flops_per_s(weight_dtype, gpu))
        if self.eager is None:
            cls = MoeStepModel if moe else StepTimeModel
            self.model = cls(weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes, rates=rates, params=params,
                             **moe)
        else:
            cls = MoeEagerStepModel if moe else EagerStepModel
            self.model = cls(weight_bytes=weight_bytes, kv_bytes_per_token=kv_bytes, rates=rates,
                             eager=self.eager, params=params, **moe)
        # fixed weights: the simulator replays a converged engine, it does not learn
        self.model.theta = np.array(self.weights.as_tuple())
        self.model._theta = self.weights.as_tuple()
        self.tp = tp
        self._allreduces = 2 * shard.num_layers
        self._token_bytes = model.hidden_size * ACT_BYTES
        self._link = (gpu.link_gb_s, gpu.link_latency_us)
        self.tp_costs = tp_costs or load_tp_costs()
        # seconds per step and per sequence of the layers' fixed costs that tp did not divide
        share = (1.0 - 1.0 / tp) * shard.num_layers * 1e-6
        self._tp_fixed = (share * self.tp_costs.layer_us, share * self.tp_costs.layer_seq_us)
        # the fused all-reduce + residual add + RMSNorm (MESHSERVE_TP_FUSED_NORM): what each all-reduce saves
        self._fused = None if tp == 1 or not fused_norm else load_fused_norm(fused_norm)
        # decode_line's terms by batch size n, (fixed, per_token, b): a = fixed + per_token * context (the fast
        # replica reads them inline, a call less per decode segment)
        self.decode_lines: dict[int, tuple[float, float, float]] = {}
        # step_s's terms by step shape (num_tokens, num_seqs) (the fast replica reads them inline)
        self.step_shapes: dict[tuple[int, int], tuple[float, ...]] = {}
        # per step: each MoE layer's routing and alignment launch (calibration.toml [moe] route_us), each MLA
        # layer's own launches (latent projections, absorbed q and output: [mla] layer_us)
        self._fixed_s = (shard.num_moe_layers * moe_costs.route_us + shard.num_layers * mla.layer_us) * 1e-6
        # the fit's cost per sequence (StepWeights.seq_us), not divided by tp: sampling rows and host work do not
        # shrink with it (an assumption: no TP run has measured it)
        self._seq_s = self.weights.seq_us * 1e-6
        # a one-token step's dense term at its own factor (StepWeights.one_row_dense_factor), as the difference
        # from the shared factor's: one more term of extra_s, so every path that prices a step sees it. A dense
        # model's only: the factor is the dense GEMVs' rate (fit_one_row, on the 8B's W1); a MoE or MLA model's
        # one-token step runs other kernels, priced by its own [moe] / [mla] costs (fit_layer_cost)
        one_row = None if model.is_moe or model.is_mla else self.weights.one_row_dense_factor
        self._one_row_s = 0.0 if one_row is None else (one_row - self.weights.dense_factor) * self.model.dense_s(1)

    def comm_s(self, num_tokens: int) -> float:
        """Two all-reduces per layer of the step's hidden states (0 without TP)."""
        if self.tp == 1:
            return 0.0
        nbytes = num_tokens * self._token_bytes
        each = allreduce_s(nbytes, self.tp, *self._link)
        if self._fused is not None:
            each -= self._fused.saving_s(nbytes)
        return self._allreduces * each

    def tp_s(self, num_tokens: int, num_seqs: int) -> float:
        """What TP adds to the divided TP=1 terms: the all-reduces and the per-layer costs tp does not divide,
        (1 - 1/tp) x layers x (layer_us + layer_seq_us x sequences). 0.0 without TP (bit-identical to TP=1)."""
        if self.tp == 1:
            return 0.0
        fixed, per_seq = self._tp_fixed
        return self.comm_s(num_tokens) + (fixed + per_seq * num_seqs)

    def extra_s(self, num_tokens: int, num_seqs: int) -> float:
        """What the step model's terms leave out: TP's (tp_s), the MoE layers' routing (MoeCosts), the MLA
        layers' own launches (MlaCosts), the fit's cost per sequence (seq_us; 0.0 for step-trace fits) and a
        one-token step's own dense factor (one_row_dense_factor; 0.0 without)."""
        extra = self.tp_s(num_tokens, num_seqs) + self._fixed_s + self._seq_s * num_seqs
        return extra + self._one_row_s if num_tokens == 1 else extra

    def __call__(self, shape: StepShape) -> float:
        return self.model.predict(shape) + self.extra_s(shape.num_tokens, shape.num_seqs)

    def host_s(self, shape: StepShape) -> float:
        """Host time before this step that the engine's step model does not see (eager_steps.py; 0.0 without)."""
        return self.host_time_s(shape.num_tokens, shape.num_seqs)

    def host_time_s(self, num_tokens: int, num_seqs: int) -> float:
        """host_s without a StepShape (the fast replica)."""
        return 0.0 if self.eager is None else self.eager.host_s(num_tokens, num_seqs)

    def time_s(self, num_tokens: int, num_seqs: int, context_tokens: int) -> float:
        """self(StepShape(num_tokens, num_seqs, context_tokens)), the same floating-point operations, without
        building a StepShape."""
        return self.step_s(num_tokens, num_seqs, context_tokens)[0]

    def step_s(self, num_tokens: int, num_seqs: int, context_tokens: int) -> tuple[float, float]:
        """(time_s, host_time_s) of one step (the fast replica prices one step per request): predict's sum with
        the terms that depend on the step's shape alone computed once per shape, so the same floating-point
        operations."""
        if num_tokens == 0:
            return 0.0, 0.0
        terms = self.step_shapes.get((num_tokens, num_seqs))
        if terms is None:
            terms = self.step_shapes[(num_tokens, num_seqs)] = self._shape_terms(num_tokens, num_seqs)
        dense, t2, kv_bytes, bandwidth, mixed, eager, extra, host = terms
        predicted = dense + t2 * (1e3 * context_tokens * kv_bytes / bandwidth) + mixed
        predicted = (0.0 if predicted < 0.0 else predicted) * 1e-3  # noqa: FURB136 - max() is a slow call (3.11)
        if predicted > 0.0:  # EagerStepModel.predict's sum (x + 0.0 is x: no eager term)
            predicted = predicted + eager
        return predicted + extra, host

    def _shape_terms(self, num_tokens: int, num_seqs: int) -> tuple[float, ...]:
        """step_s's terms of one shape: predict's sum up to its KV term (t0 + t1 dense), t2 and the KV term's
        factors, the mixed term (t3 or 0), the eager device time, what TP and the fixed costs add, host time."""
        m = self.model
        t0, t1, t2, t3 = m._theta
        eager = 0.0 if self.eager is None else self.eager.device_s(num_tokens, num_seqs)
        return (t0 + t1 * (1e3 * m.dense_s(num_tokens)), t2, m.kv_bytes_per_token, m.rates.bandwidth,
                t3 * (1.0 if num_seqs < num_tokens > m.graphed_mixed_tokens else 0.0), eager,
                self.extra_s(num_tokens, num_seqs), self.host_time_s(num_tokens, num_seqs))

    def decode_durations(self, n: int, context: int, steps: int) -> list[float]:
        """self(StepShape(n, n, context + n * j)) for j = 1..steps: the same floating-point operations as
        StepTimeModel.predict, without a StepShape per step (decode runs lay out thousands of steps)."""
        m = self.model
        t0, t1, t2, t3 = m._theta
        dense, _, mixed = m._terms(StepShape(n, n, context + n))
        base = t0 + t1 * dense  # predict's sum, left to right
        kvb, bw, comm = m.kv_bytes_per_token, m.rates.bandwidth, self.extra_s(n, n)
        return [max(base + t2 * (1e3 * (context + n * j) * kvb / bw) + t3 * mixed, 0.0) * 1e-3 + comm
                for j in range(1, steps + 1)]

    def decode_line(self, n: int, context: int) -> tuple[float, float]:
        """(a, b) with self(StepShape(n, n, context + n * j)) = a + b * j for decode steps (j >= 1) of n
        sequences holding `context` KV tokens before the first (the fast replica's closed form; equal to
        decode_durations up to rounding while the model's time is positive, which calibrated weights keep)."""
        line = self.decode_lines.get(n)
        if line is None:  # the batch's own terms: weights or FLOPs, what TP adds
            m = self.model
            t0, t1, t2, _ = m._theta
            dense, _, _ = m._terms(StepShape(n, n, n))
            per_token = t2 * m.kv_bytes_per_token / m.rates.bandwidth
            line = self.decode_lines[n] = ((t0 + t1 * dense) * 1e-3 + self.extra_s(n, n), per_token, per_token * n)
        fixed, per_token, b = line
        return fixed + per_token * context, b


def read_step_trace(path: str | Path) -> list[dict]:
    """The JSON lines of `meshserve serve --step-trace FILE` (gzip or plain); ARCHIVE.tgz:MEMBER reads a member
    of a results archive (the trace of benchmarks/results/h200_1201_s15/w3_qwen_meshserve/w3q.tgz)."""
    archive, _, member = str(path).partition(".tgz:")
    if member:
        with tarfile.open(archive + ".tgz") as tar:
            raw = tar.extractfile(member)
            if raw is None:
                raise InvalidArgumentError(f"{path}: not a file in the archive", param="step_trace")
            data = raw.read()
        text = gzip.decompress(data) if member.endswith(".gz") else data
        return [json.loads(line) for line in text.decode().splitlines() if line.strip()]
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def read_step_traces(paths: str) -> list[dict]:
    """Several step traces (comma-separated paths) as one list of rows, in order (their `t` restarts at each)."""
    return [row for path in paths.split(",") for row in read_step_trace(path)]


def fit_step_weights(rows: list[dict], weight_bytes: float, kv_bytes_per_token: float,
                     rates: DeviceRates) -> tuple[StepWeights, float]:
    """Least-squares weights for a step trace, and the mean |predicted - measured| / measured they leave."""
    model = StepTimeModel(weight_bytes, kv_bytes_per_token, rates)
    x = np.array([[1.0, *model._terms(StepShape(r["tokens"], r["seqs"], r["context"]))] for r in rows])
    y = np.array([r["actual_s"] * 1e3 for r in rows])
    theta, *_ = np.linalg.lstsq(x, y, rcond=None)
    err = float(np.mean(np.abs(x @ theta - y) / y))
    return StepWeights(*(float(v) for v in theta)), err


# W1's mean KV context a decode step holds: its 128-token prompt (bench.workloads.w1_prompt) plus half its new tokens
W1_CONTEXT = 128 + W1_NEW_TOKENS // 2


def fit_one_row(weights: StepWeights, decode_tok_s: float, weight_bytes: float, kv_bytes_per_token: float,
                rates: DeviceRates, context: int = W1_CONTEXT) -> StepWeights:
    """weights with one_row_dense_factor set so that a one-token decode step at `context` lasts what W1 measured
    (1 / decode_tok_s): a trace's fit prices that step at its steps' own rate, and W2's and W3's are cuBLAS GEMM
    steps of 2-256 rows, where one row runs the GEMV (H200 8B: the W2 + W3 fit said 188 tok/s for 235)."""
    model = StepTimeModel(weight_bytes, kv_bytes_per_token, rates)
    dense, kv, _ = model._terms(StepShape(1, 1, context))
    rest = weights.constant_ms + weights.kv_factor * kv + weights.seq_us * 1e-3
    return dataclasses.replace(weights, one_row_dense_factor=(1e3 / decode_tok_s - rest) / dense)


LAYER_COSTS = {"moe": "floor_us", "mla": "layer_us"}  # fit_layer_cost's tables and the field each fits


def fit_layer_cost(model: ModelSpec, gpu: GpuSpec, weights: StepWeights, decode_tok_s: float, table: str,
                   moe_costs: MoeCosts | None = None, mla_costs: MlaCosts | None = None,
                   context: int = W1_CONTEXT) -> float:
    """[moe] floor_us (table "moe") or [mla] layer_us ("mla") such that a one-token decode step at `context`
    lasts what W1 measured (1 / decode_tok_s), the weights and the other costs as given: per-layer costs of the
    one-token step that a step trace of GEMM steps does not see (the MoE GEMV's short wave, MLA's own launches).
    The step's time grows with either, so bisection; a measured rate the step reaches with the cost at 0 (or
    not even at 10 ms a layer) is an InvalidArgumentError."""
    if table not in LAYER_COSTS:
        raise InvalidArgumentError(f"table takes one of {sorted(LAYER_COSTS)}, got {table!r}", param="table")
    if not (model.is_moe if table == "moe" else model.is_mla):
        raise InvalidArgumentError(f"{model.name} has no {'MoE' if table == 'moe' else 'MLA'} layers", param="model")
    moe_costs, mla_costs = moe_costs or load_moe_costs(), mla_costs or load_mla_costs()
    target = 1.0 / decode_tok_s
    shape = StepShape(1, 1, context)

    def step_s(us: float) -> float:
        moe = dataclasses.replace(moe_costs, floor_us=us) if table == "moe" else moe_costs
        mla = dataclasses.replace(mla_costs, layer_us=us) if table == "mla" else mla_costs
        return StepCost(model, gpu, weights=weights, moe_costs=moe, mla_costs=mla)(shape)

    lo, hi = 0.0, 1e4
    if not step_s(lo) < target < step_s(hi):
        raise InvalidArgumentError(f"{decode_tok_s:g} tok/s is out of reach of {table} {LAYER_COSTS[table]} in "
                                   f"[0, {hi:g}] us with these weights", param="decode_tok_s")
    while hi - lo > 1e-4:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step_s(mid) < target else (lo, mid)
    return (lo + hi) / 2


def curve_points(curve: dict) -> tuple[list[tuple[int, float]], float]:
    """A `bench latency --curve` JSON's decode points as (batch, ms a step) and the mean KV context a sequence
    holds over them (its prompt plus half its output)."""
    rows = [r for r in curve["results"] if r.get("workload", "").startswith("decode-b")]
    if not rows:
        raise InvalidArgumentError("the curve JSON has no decode-b* results", param="curve")
    context = rows[0]["input_len"] + rows[0]["output_len"] / 2
    return [(r["batch"], r["batch"] / r["output_tok_per_s"] * 1e3) for r in rows], context


def fit_curve_weights(points: list[tuple[int, float]], context: float, weight_bytes: float,
                      kv_bytes_per_token: float, rates: DeviceRates, kv_factor: float,
                      mixed_ms: float) -> tuple[StepWeights, float]:
    """Weights from a decode curve (batch, ms a step) at short contexts, with the KV factor given: the decode
    kernel's measured read rate (the data sheet's bandwidth over it), since the curve's KV reads are too small
    to fit it. Fitted: the constant, the dense factor and a cost per sequence (seq_us), which a step trace of
    one context length cannot tell from its KV term (PLANNER.md, "W2 on an H100"). mixed_ms is taken as given
    (a decode curve has no prefill). Returns the weights and the mean |fitted - measured| / measured."""
    model = StepTimeModel(weight_bytes, kv_bytes_per_token, rates)
    x, kv_ms = [], []
    for n, _ in points:
        dense, kv, _ = model._terms(StepShape(n, n, round(n * context)))
        x.append([1.0, dense, n * 1e-3])
        kv_ms.append(kv_factor * kv)
    x, kv_ms = np.array(x), np.array(kv_ms)
    measured = np.array([ms for _, ms in points])
    theta, *_ = np.linalg.lstsq(x, measured - kv_ms, rcond=None)
    err = float(np.mean(np.abs(x @ theta + kv_ms - measured) / measured))
    constant, dense_factor, seq_us = (float(v) for v in theta)
    return StepWeights(constant, dense_factor, kv_factor, mixed_ms, seq_us), err


def _refit_parser(mode: str):
    import argparse

    from meshserve.cli_types import non_negative_float, positive_float

    prog = "python -m meshserve.simulator.step_cost"
    if mode == "layer":
        p = argparse.ArgumentParser(prog=f"{prog} --layer-cost", description="[moe] floor_us or [mla] layer_us "
                                    "from a build's W1 (`meshserve bench latency`: decode tok/s), the fit's weights and "
                                    "the other costs as calibration.toml has them (fit_layer_cost).")
        p.add_argument("table", choices=sorted(LAYER_COSTS))
        p.add_argument("model", help="a MoE (moe) or MLA (mla) preset, an HF id of one, or a config.json path")
        p.add_argument("gpu", help="a GPU of the planner's catalog (e.g. H200)")
        p.add_argument("decode_tok_s", type=positive_float, metavar="DECODE_TOK_S")
        p.add_argument("--calibration", default="default", help="the fit whose weights and tables price the step")
    elif mode == "curve":
        p = argparse.ArgumentParser(prog=f"{prog} --curve", description="Step weights from a decode curve "
                                    "(`meshserve bench latency --curve ... --output-json`) with the KV factor given.")
        p.add_argument("curve", metavar="CURVE.json")
        p.add_argument("gpu", help="a GPU of the planner's catalog (e.g. H100-SXM)")
        p.add_argument("model", help="a preset, an HF id of one, or a config.json path")
        p.add_argument("kv_factor", type=positive_float, help="the data sheet's bandwidth over the decode kernel's")
        p.add_argument("mixed_ms", type=non_negative_float, help="the extra time of a step carrying prefill")
    else:
        p = argparse.ArgumentParser(prog=prog, description="Step weights fitted to step traces "
                                    "(`meshserve serve --step-trace FILE`); --curve CURVE.json ... for a decode curve; --layer-cost "
                                    "moe|mla ... for a MoE / MLA layer's own cost.")
        p.add_argument("traces", metavar="TRACE[,TRACE...]")
        p.add_argument("gpu", nargs="?", default="H200")
        p.add_argument("model", nargs="?", default="llama-3.1-8b")
        p.add_argument("--w1", type=positive_float, metavar="DECODE_TOK_S",
                       help="the build's W1 decode tok/s (`bench latency`): one_row_dense_factor from it (fit_one_row)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The refit command: weights to paste into calibration.toml, from step traces or a decode curve. Bad input
    (a missing or malformed file, an unknown GPU or model, a bad number) is one line on stderr, exit 2."""
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.model import load_model

    argv = list(sys.argv[1:] if argv is None else argv)
    mode = {"--curve": "curve", "--layer-cost": "layer"}.get(argv[0] if argv else "", "traces")
    curve = mode == "curve"
    parser = _refit_parser(mode)
    ns = parser.parse_args(argv if mode == "traces" else argv[1:])
    try:
        gpu = get_gpu(ns.gpu)
        if mode == "layer":
            model = load_model(ns.model)
            fit = calibration_for(ns.calibration, model.name, gpu.name)
            us = fit_layer_cost(model, gpu, load_calibration(fit), ns.decode_tok_s, ns.table,
                                load_moe_costs(fit), load_mla_costs(fit))
            print(f"# {model.name} on {gpu.name}, fit {fit}, W1 {ns.decode_tok_s:g} decode tok/s\n"
                  f"[{ns.table}]\n{LAYER_COSTS[ns.table]} = {us:.2f}")
            return 0
        shard = stage_shard(load_model(ns.model), Layout(), 0)
        rates = DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16"))
        if curve:
            try:
                points, context = curve_points(json.loads(Path(ns.curve).read_text()))
            except (KeyError, TypeError, AttributeError, ZeroDivisionError):
                raise InvalidArgumentError(f"{ns.curve}: not a `bench latency --curve` JSON", param="curve") from None
            w, err = fit_curve_weights(points, context, shard.weight_bytes, shard.kv_bytes_per_token, rates,
                                       ns.kv_factor, ns.mixed_ms)
            print(f"# {len(points)} decode points, context {context:.0f}\nconstant_ms = {w.constant_ms:.4f}\n"
                  f"dense_factor = {w.dense_factor:.4f}\nkv_factor = {w.kv_factor:.4f}\nmixed_ms = {w.mixed_ms:.4f}\n"
                  f"seq_us = {w.seq_us:.3f}\nmean_abs_error = {err:.3f}")
            return 0
        try:
            rows = read_step_traces(ns.traces)
            if not rows:
                raise InvalidArgumentError(f"{ns.traces}: no steps", param="traces")
            w, err = fit_step_weights(rows, shard.weight_bytes, shard.kv_bytes_per_token, rates)
            if ns.w1:
                w = fit_one_row(w, ns.w1, shard.weight_bytes, shard.kv_bytes_per_token, rates)
        except (KeyError, TypeError, ZeroDivisionError, np.linalg.LinAlgError):
            raise InvalidArgumentError(f"{ns.traces}: not a step trace (`meshserve serve --step-trace`)",
                                       param="traces") from None
    except InvalidArgumentError as e:
        parser.error(str(e))
    except (OSError, ValueError, tarfile.TarError) as e:  # a missing file, bad JSON (a ValueError), a bad archive
        parser.error(f"{e.__class__.__name__}: {e}")
    print(f"# {len(rows)} steps\nweight_bytes = {shard.weight_bytes:.0f}\n"
          f"kv_bytes_per_token = {shard.kv_bytes_per_token:.0f}\nconstant_ms = {w.constant_ms:.4f}\n"
          f"dense_factor = {w.dense_factor:.4f}\nkv_factor = {w.kv_factor:.4f}\nmixed_ms = {w.mixed_ms:.4f}\n"
          f"mean_abs_error = {err:.3f}")
    if w.one_row_dense_factor is not None:
        print(f"one_row_dense_factor = {w.one_row_dense_factor:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
