"""Speed predictions from first principles: decode is bytes moved ÷ bandwidth, prefill is FLOPs ÷ FLOP/s,
plus communication (α + β·bytes per all-reduce, all-to-all or pipeline hop).

Every device time is divided by the GPU's `efficiency` (fitted by calibration); the roofline is the same
model with efficiency 1, no KV and no communication: a ceiling no implementation can beat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshserve.planner.hardware import GpuSpec
from meshserve.planner.memory import StageShard, kv_tokens_held, stage_shard, weight_dtype_bytes
from meshserve.planner.model import ModelSpec
from meshserve.planner.moe_comm import ep_traffic, tp_moe_all_reduce_bytes
from meshserve.planner.parallel import Layout
from meshserve.planner.pipeline_host import NO_HOST, PipelineHost, pipelined_itl

ACT_BYTES = 2  # bf16 hidden states on the wire


@dataclass(frozen=True)
class Workload:
    """Request shape: prompt tokens and generated tokens per request."""

    input_len: int = 1024
    output_len: int = 256

    @property
    def mean_decode_context(self) -> int:
        """Average tokens in a sequence's KV while it decodes."""
        return self.input_len + self.output_len // 2


@dataclass(frozen=True)
class StepTime:
    """One decode step of one pipeline stage (seconds)."""

    memory_s: float
    compute_s: float
    comm_s: float
    overhead_s: float = 0.0  # per-layer fixed cost (launches), which bandwidth and FLOPs do not cover
    ep_bytes: float = 0.0  # bytes one GPU sends in the expert-parallel exchange (dispatch, combine, gather)
    tokens: int = 0  # sequences of one replica in this step (PP: the step in flight's share of the batch)
    moe_layers: int = 0  # MoE layers of this stage
    ep_in_graph: bool = False  # EP inside the TP group replayed from a CUDA graph: all-reduce, no all-to-all

    @property
    def total_s(self) -> float:
        return max(self.memory_s, self.compute_s) + self.comm_s + self.overhead_s


@dataclass(frozen=True)
class Prediction:
    """Predicted speed of one layout at `concurrency` concurrent sequences (all replicas together)."""

    concurrency: int
    batch_per_replica: int
    ttft_s: float
    itl_s: float
    decode_tok_per_s: float  # concurrency / ITL: generated tokens per second while everyone decodes
    output_tok_per_s: float  # same with each request's prefill time paid in, continuous batching
    roofline_tok_per_s: float  # decode ceiling at this concurrency: efficiency 1, weights only, no comm
    roofline_bytes_per_gpu: float  # weight bytes one GPU reads per decode step (per stage pass)
    step: StepTime


def allreduce_s(nbytes: float, n: int, link_gb_s: float, latency_us: float) -> float:
    """Ring all-reduce: each GPU sends and receives 2(n-1)/n of the message."""
    if n <= 1:
        return 0.0
    return latency_us * 1e-6 + 2 * (n - 1) / n * nbytes / (link_gb_s * 1e9)


def all_to_all_s(nbytes: float, n: int, link_gb_s: float, latency_us: float) -> float:
    """All-to-all where each GPU sends (n-1)/n of `nbytes` to the others."""
    if n <= 1:
        return 0.0
    return latency_us * 1e-6 + (n - 1) / n * nbytes / (link_gb_s * 1e9)


def expected_experts_touched(num_experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a batch of `tokens` routes to, assuming uniform routing."""
    if num_experts == 0:
        return 0.0
    return num_experts * (1 - (1 - top_k / num_experts) ** max(tokens, 0))


def weight_bytes_moved(model: ModelSpec, layout: Layout, shard: StageShard, batch: int) -> float:
    """Weight bytes one GPU reads in a decode step: all of them for dense models (the convention of the
    benchmarks' "% of roofline", embedding included), only the experts the batch routes to for MoE."""
    if not model.is_moe:
        return shard.weight_bytes
    # EP: experts see the tokens of every DP replica; without EP each replica's batch touches its own.
    tokens = batch * (layout.dp if layout.ep > 1 else 1)
    touched = expected_experts_touched(model.num_experts, model.experts_per_token, tokens)
    held_fraction = shard.experts_per_gpu / model.num_experts
    return shard.dense_weight_bytes + shard.num_moe_layers * touched * held_fraction * shard.expert_slice_bytes


def _ep_link(gpu: GpuSpec, layout: Layout, gpus_per_node: int) -> tuple[float, float]:
    if layout.ep <= gpus_per_node:
        return gpu.link_gb_s, gpu.link_latency_us
    return gpu.inter_node_gb_s, gpu.inter_node_latency_us


def layer_comm(model: ModelSpec, layout: Layout, gpu: GpuSpec, tokens: int, layers: int, moe_layers: int,
               gpus_per_node: int, in_graph: bool = False) -> tuple[float, float]:
    """(seconds, EP bytes one GPU sends) of the communication of `tokens` tokens of one replica through `layers`
    layers, `moe_layers` of them MoE (a decode step's batch or a prefill's prompt tokens).

    in_graph: the step replays a CUDA graph, where the engine's EP inside the TP group cannot size an all-to-all
    (layers/fused_moe.py): every rank runs its own experts on all the tokens and one all-reduce sums the parts,
    the collective TP uses; the EP bytes are then those of that all-reduce."""
    msg = tokens * model.hidden_size * ACT_BYTES
    ep_in_tp = layout.ep > 1 and layout.dp == 1
    # One all-reduce after attention, one after each MLP unless EP replaces it with dispatch/combine.
    moe_reduces = layout.ep == 1 or (ep_in_tp and in_graph)
    n_allreduce = layers + (layers - moe_layers) + (moe_layers if moe_reduces else 0)
    comm_s = n_allreduce * allreduce_s(msg, layout.tp, gpu.link_gb_s, gpu.link_latency_us)
    ep_bytes = 0.0
    if ep_in_tp and in_graph:
        ep_bytes = tp_moe_all_reduce_bytes(model, layout.tp, tokens, moe_layers)
    elif ep_in_tp:
        # the engine's EP inside the TP group: slices dispatched and combined, then all-gathered (moe_comm.py)
        traffic = ep_traffic(model, layout.ep, tokens, moe_layers)
        ep_bytes = traffic.total
        n = moe_layers
        comm_s += 2 * n * gpu.link_latency_us * 1e-6 + traffic.all_to_all / (gpu.link_gb_s * 1e9)
        comm_s += n * gpu.link_latency_us * 1e-6 + traffic.all_gather / (gpu.link_gb_s * 1e9)
    elif layout.ep > 1:
        # DP attention, experts over all dp x tp GPUs: the dp replicas' tokens x dp are spread over the ep GPUs,
        # each sending its share's top-k rows (tokens x dp / ep x k x h) to the experts' owners (one replica
        # alone, as for one prompt: each of its tp GPUs sends tokens / tp, the same share)
        bw, lat = _ep_link(gpu, layout, gpus_per_node)
        per_gpu = msg * model.experts_per_token * layout.dp / layout.ep
        comm_s += moe_layers * 2 * all_to_all_s(per_gpu, layout.ep, bw, lat)  # dispatch + combine
        ep_bytes = moe_layers * 2 * (layout.ep - 1) / layout.ep * per_gpu
    return comm_s, ep_bytes


# the engine's PDL rule (kernels/pdl.auto_policy: batch-1 decode kernels chained with programmatic dependent
# launch for models of hidden size <= 2,048, dense or MoE, and since 2026-12-04 for larger dense models of 16-bit
# weights in one-row decode steps, of fp8 and int4 weights since the GEMVs of both wait under PDL), kept here as
# numbers: the planner imports no engine code (tests/planner/test_perf.py checks the two agree)
PDL_MAX_HIDDEN = 2048
PDL_WEIGHT_DTYPES = ("bf16", "fp16", "fp8", "int4")


def chains_with_pdl(model: ModelSpec, weight_dtype: str, ranks: int) -> bool:
    """Whether the engine's batch-1 decode steps of this model run under PDL: hidden size <= PDL_MAX_HIDDEN, or a
    dense model of 16-bit, fp8 or int4 weights on one GPU (ranks: TP x PP of a replica; kernels/pdl.auto_policy,
    measured on one GPU only: H200 W1 Llama-3.1-8B, 2026-12-04: bf16 230.9 tok/s, predicted 230; fp8 354-365,
    predicted 362 where the plain overhead said 302; AWQ int4 424.4 with PDL, 391.9 without, predicted 413 with
    quantized_gemv_extra_s). Layouts over several GPUs keep the plain per-layer cost (the engine keeps PDL off
    there; their fit holds the all-reduces too)."""
    if model.hidden_size <= PDL_MAX_HIDDEN:
        return True
    return model.num_experts == 0 and weight_dtype in PDL_WEIGHT_DTYPES and ranks == 1


def layer_overhead_s(model: ModelSpec, gpu: GpuSpec, batch: int, weight_dtype: str = "bf16",
                     ranks: int = 1) -> float:
    """The fixed time per layer of a decode step: the GPU's layer_overhead_us, or at batch 1 for a model the
    engine chains with PDL (chains_with_pdl: the GEMV path, every launch's start under the one before) its
    layer_overhead_pdl_us where the catalog has one. H200, W1: Qwen3-0.6B 22.6 and Qwen3-30B-A3B 28.5 us a layer
    above the bytes at the fitted efficiency (2026-12-03); Llama-3.1-8B 34.7 without PDL (2026-12-03; the
    catalog's 40 is the 2 x H200 fit of 2026-11-30) and 23.7 with it (230.9 tok/s, 2026-12-04)."""
    if batch == 1 and gpu.layer_overhead_pdl_us is not None and chains_with_pdl(model, weight_dtype, ranks):
        return gpu.layer_overhead_pdl_us * 1e-6
    return gpu.layer_overhead_us * 1e-6


# The batch-1 GEMVs' weight streams as fractions of the fitted rate (hbm x efficiency; H200 4.51 TB/s): the H200
# sweep of 2026-12-04 (tools/bench_quant_gemv.py, one Llama-3.1-8B layer's four projections in CUDA graphs,
# benchmarks/results/h200_1204_s35/quant_gemv/sweep*.log): the bf16 Triton GEMV 108.7 us for 436 MB (4.01 TB/s:
# 0.889), the fp8 words GEMV 59.4-59.6 us for 218 MB (3.67: 0.814), the AWQ int4 half GEMV 48.3-48.9 us for 113.5 MB with
# scales and zeros (2.33: 0.517); other GPUs assumed alike. With the largest batch each GEMV serves (one row for
# fp8; triton_int4_gemv.MAX_GEMV_ROWS for int4).
GEMV_RATE_FRACTION = {"bf16": (0.889, 1), "fp8": (0.814, 1), "int4": (0.517, 4)}


def quantized_gemv_extra_s(model: ModelSpec, shard: StageShard, gpu: GpuSpec, batch: int, weight_dtype: str,
                           efficiency: float) -> float:
    """What a dense model's quantized batch-1 GEMVs take beyond its bytes at the fitted rate, over what the
    per-layer figure holds: layer_overhead_* was fitted on 16-bit weights, so it includes the 16-bit GEMV's
    shortfall below the fitted rate, and a quantized format's GEMV falls short by its own (H200 W1 Llama-3.1-8B:
    int4 +11.4 us a layer, 487 -> 413 tok/s predicted against 424.4 measured; fp8 -1.0 us, 358 -> 362 against
    364.8). 0 for 16-bit weights, MoE models and batches past the format's GEMV."""
    fraction, rows = GEMV_RATE_FRACTION.get(weight_dtype, (1.0, 0))
    if model.num_experts or weight_dtype == "bf16" or batch > rows:
        return 0.0
    rate = gpu.hbm_bytes_per_s * efficiency
    quantized = shard.linear_weight_bytes
    as_16_bit = quantized / weight_dtype_bytes(weight_dtype) * 2
    return (quantized * (1 / fraction - 1) - as_16_bit * (1 / GEMV_RATE_FRACTION["bf16"][0] - 1)) / rate


def decode_stage_time(model: ModelSpec, layout: Layout, gpu: GpuSpec, stage: int, batch: int, context: int, *,
                      weight_dtype: str, kv_dtype: str, gpus_per_node: int, efficiency: float,
                      cuda_graphs: bool = True) -> StepTime:
    """One decode step of `batch` sequences with `context` tokens each, through one pipeline stage
    (cuda_graphs: replayed from a graph, as every decode step is unless --enforce-eager)."""
    shard = stage_shard(model, layout, stage, weight_dtype, kv_dtype)
    ctx = kv_tokens_held(model, context)
    weights = weight_bytes_moved(model, layout, shard, batch)
    kv = batch * ctx * shard.kv_bytes_per_token
    memory_s = (weights + kv) / (gpu.hbm_bytes_per_s * efficiency)

    layer_frac = shard.num_layers / model.num_layers
    head = model.head_matmul_params if stage == layout.pp - 1 else 0  # every decoded token is sampled
    gemm_flops = 2 * (model.body_matmul_params * layer_frac + head) / layout.tp
    attn_flops = 4 * shard.num_layers * model.num_heads / layout.tp * model.head_dim * ctx
    compute_s = batch * (gemm_flops + attn_flops) / (gpu.flops_per_s(weight_dtype) * efficiency)

    comm_s, ep_bytes = layer_comm(model, layout, gpu, batch, shard.num_layers, shard.num_moe_layers,
                                  gpus_per_node, in_graph=cuda_graphs)
    overhead_s = (shard.num_layers * layer_overhead_s(model, gpu, batch, weight_dtype, layout.tp * layout.pp)
                  + quantized_gemv_extra_s(model, shard, gpu, batch, weight_dtype, efficiency))
    return StepTime(memory_s, compute_s, comm_s, overhead_s, ep_bytes, batch, shard.num_moe_layers,
                    cuda_graphs and layout.ep > 1 and layout.dp == 1)


def pp_hop_s(model: ModelSpec, gpu: GpuSpec, tokens: int) -> float:
    """Hidden states and residual of `tokens` tokens (two bf16 tensors, as engine/pipeline_stage.py sends them)
    from one stage to the next node."""
    nbytes = 2 * tokens * model.hidden_size * ACT_BYTES
    return gpu.inter_node_latency_us * 1e-6 + nbytes / (gpu.inter_node_gb_s * 1e9)


def steps_in_flight(layout: Layout, pipeline_depth: int = 0) -> int:
    """Decode steps a replica keeps in flight: one without PP; with PP the engine's --pipeline-depth, or one per
    stage (ParallelConfig.pipeline_steps_in_flight)."""
    return 1 if layout.pp == 1 else pipeline_depth or layout.pp


def itl_s(model: ModelSpec, layout: Layout, gpu: GpuSpec, batch: int, context: int, *, weight_dtype: str,
          kv_dtype: str, gpus_per_node: int, efficiency: float, pipeline_depth: int = 0,
          host: PipelineHost = NO_HOST, cuda_graphs: bool = True) -> tuple[float, StepTime]:
    """Time between tokens of one sequence when `batch` sequences decode together on one replica.

    With PP the engine keeps d = steps_in_flight steps in flight (pipeline_depth, or one per stage), each over
    its own ⌈batch / d⌉ sequences (a sequence has one step in flight at a time); a step passes every stage in
    turn and a stage works on one step at a time. A sequence's next token waits for its step to pass all stages
    and the hops, and for the d steps to take their turn on the slowest stage:
    ITL = max(Σ stage times + (pp-1) hops, d × slowest stage time). With d = pp equal stages that is pp × stage
    time + hops; with fewer steps than stages, stages idle. `host` (PP only): the engine core's time per step and
    round trip, and the token hand-off (pipeline_host.pipelined_itl); NO_HOST leaves the stages alone.
    """
    # a sequence has one step in flight at a time, so fewer sequences than --pipeline-depth keep fewer steps in
    # flight (the engine schedules no empty step): 2 sequences at depth 8 were charged 8 turns on the slowest stage,
    # an 8B ITL of 25.6 ms on 2 x H200 where the simulator's engine scheduler runs it in 10.8
    d = min(steps_in_flight(layout, pipeline_depth), max(1, batch))
    groups = layout.pp if host.token_handoff and layout.pp > 1 else d  # the hand-off splits the batch pp ways
    micro = math.ceil(batch / groups)
    steps = [decode_stage_time(model, layout, gpu, s, micro, context, weight_dtype=weight_dtype,
                               kv_dtype=kv_dtype, gpus_per_node=gpus_per_node, efficiency=efficiency,
                               cuda_graphs=cuda_graphs)
             for s in range(layout.pp)]
    slowest = max(steps, key=lambda st: st.total_s)
    passes = sum(st.total_s for st in steps) + (layout.pp - 1) * pp_hop_s(model, gpu, micro)
    if layout.pp == 1:
        return passes, slowest
    return pipelined_itl(passes, slowest.total_s, d, layout.pp, host), slowest


def prefill_s(model: ModelSpec, layout: Layout, gpu: GpuSpec, num_seqs: int, prompt_len: int, *,
              weight_dtype: str, efficiency: float, pipelined: bool = False, gpus_per_node: int = 0) -> float:
    """Prefill of `num_seqs` prompts of `prompt_len` tokens: FLOPs ÷ FLOP/s of one stage's TP group (stages
    run one after another for a given prompt), never faster than each stage's GPUs reading their weights once,
    plus each layer's all-reduces or expert exchange (as a decode step's, for the prompt tokens).

    pipelined (PP, a replica's batch of prompts): the prompts ride different steps in flight, so the stages work
    on them at once (as they do on decode steps): the most loaded stage's share of the work sets the time, and
    each link carries the tokens once, the links side by side. One prompt (TTFT) has one step in flight at a
    time and passes the stages one after another."""
    tokens = num_seqs * prompt_len
    # the head runs on each prompt's last token only (the one sampled)
    gemm = model.matmul_flops(tokens, num_seqs)
    attn = num_seqs * 2 * model.num_layers * model.num_heads * model.head_dim * prompt_len ** 2  # causal
    compute = (gemm + attn) / (layout.tp * gpu.flops_per_s(weight_dtype) * efficiency)
    # each stage's GPUs stream the projections and experts they hold (EP: 1/EP of the experts, not 1/TP)
    shards = [stage_shard(model, layout, s, weight_dtype) for s in range(layout.pp)]
    comms = [layer_comm(model, layout, gpu, tokens, sh.num_layers, sh.num_moe_layers,
                        gpus_per_node or gpu.gpus_per_node)[0] for sh in shards]
    bandwidth = gpu.hbm_bytes_per_s * efficiency
    if pipelined and 1 < layout.pp <= num_seqs:  # fewer prompts than stages: they cannot fill them
        share = max(sh.num_layers for sh in shards) / model.num_layers
        memory = max(sh.linear_weight_bytes for sh in shards) / bandwidth
        return max(compute * share, memory) + max(comms) + pp_hop_s(model, gpu, tokens)
    memory = sum(sh.linear_weight_bytes for sh in shards) / bandwidth
    return max(compute, memory) + sum(comms) + (layout.pp - 1) * pp_hop_s(model, gpu, tokens)


def roofline(model: ModelSpec, layout: Layout, gpu: GpuSpec, concurrency: int, *,
             weight_dtype: str, pipeline_depth: int = 0) -> tuple[float, float]:
    """(decode tok/s ceiling, weight bytes per GPU per step): every GPU streams its weights at full HBM
    bandwidth once per step (PP: once per step in flight, each over its share of the batch), and never beats
    its peak FLOP/s."""
    batch = max(1, math.ceil(concurrency / layout.dp))
    seqs = max(1, concurrency)  # the sequences there are: 1 on DP=8 is one replica's tokens, not dp x batch
    d = min(steps_in_flight(layout, pipeline_depth), batch)  # no empty steps in flight (itl_s)
    micro = math.ceil(batch / d)
    per_gpu = max(weight_bytes_moved(model, layout, stage_shard(model, layout, s, weight_dtype), micro)
                  for s in range(layout.pp))
    step = d * per_gpu / gpu.hbm_bytes_per_s
    bandwidth_bound = seqs / step
    flops_per_token = model.matmul_flops(1, 1)
    busy_gpus = min(layout.dp, seqs) * layout.gpus_per_replica  # an idle replica adds no FLOP/s
    compute_bound = busy_gpus * gpu.flops_per_s(weight_dtype) / flops_per_token
    return min(bandwidth_bound, compute_bound), per_gpu


def predict(model: ModelSpec, layout: Layout, gpu: GpuSpec, concurrency: int, workload: Workload, *,
            weight_dtype: str = "bf16", kv_dtype: str = "bf16", gpus_per_node: int | None = None,
            efficiency: float | None = None, pipeline_depth: int = 0, host: PipelineHost = NO_HOST,
            cuda_graphs: bool = True) -> Prediction:
    """TTFT, ITL and throughput of `layout` serving `concurrency` sequences of `workload` (PP: pipeline_depth
    steps in flight, 0 one per stage, as the engine's --pipeline-depth; host: the engine core's per-step cost;
    cuda_graphs: decode steps replay CUDA graphs, False with --enforce-eager)."""
    eff = gpu.efficiency if efficiency is None else efficiency
    per_node = gpus_per_node or gpu.gpus_per_node
    batch = max(1, math.ceil(concurrency / layout.dp))
    itl, step = itl_s(model, layout, gpu, batch, workload.mean_decode_context, weight_dtype=weight_dtype,
                      kv_dtype=kv_dtype, gpus_per_node=per_node, efficiency=eff, pipeline_depth=pipeline_depth,
                      host=host, cuda_graphs=cuda_graphs)
    ttft = prefill_s(model, layout, gpu, 1, workload.input_len, weight_dtype=weight_dtype, efficiency=eff,
                     gpus_per_node=per_node)
    # Continuous batching: a replica spends output_len steps decoding its batch plus the batch's prefills (PP:
    # the prompts spread over the steps in flight, every stage busy).
    cycle = workload.output_len * itl + prefill_s(model, layout, gpu, batch, workload.input_len,
                                                  weight_dtype=weight_dtype, efficiency=eff, pipelined=True,
                                                  gpus_per_node=per_node)
    # the replicas hold `concurrency` sequences in all, the fullest `batch` of them (its ITL and cycle are the
    # slowest): dp x batch tokens a step only when dp divides the concurrency
    seqs = max(1, concurrency)
    output = seqs * workload.output_len / cycle
    # the hand-off splits the batch over pp steps whatever the depth: pp passes of the weights per batch
    roof, roof_bytes = roofline(model, layout, gpu, concurrency, weight_dtype=weight_dtype,
                                pipeline_depth=layout.pp if host.token_handoff else pipeline_depth)
    return Prediction(concurrency=concurrency, batch_per_replica=batch, ttft_s=ttft, itl_s=itl,
                      decode_tok_per_s=seqs / itl, output_tok_per_s=output,
                      roofline_tok_per_s=roof, roofline_bytes_per_gpu=roof_bytes, step=step)
