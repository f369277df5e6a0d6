"""What a simulation runs: the model, GPUs and layout, the engine's settings per replica, the router."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from meshserve.config import CacheConfig, ParallelConfig, SchedulerConfig
from meshserve.errors import InvalidArgumentError
from meshserve.models.presets import find_preset
from meshserve.planner.hardware import GpuSpec, get_gpu, load_catalog
from meshserve.planner.layout import structural_problem
from meshserve.planner.memory import KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES, memory_per_gpu
from meshserve.planner.model import ModelSpec, load_model
from meshserve.planner.parallel import Layout
from meshserve.router.config import RouterConfig
from meshserve.simulator.frontend import FrontEndCosts
from meshserve.simulator.frontend_stalls import STALLS_H200, FrontEndStalls
from meshserve.simulator.router_node import RouterCosts
from meshserve.simulator.step_cost import calibration_for

# replicas past which a fleet is refused: each is ~4 KB and ~65 us to build before the first request (100,000:
# 7 s and 0.4 GB on one core), so a mistyped --num-gpus ran for hours
MAX_REPLICAS = 100_000
MAX_API_SERVERS = 1024  # API processes per replica
ROUTER_POLICIES = ("least-outstanding", "round-robin", "prefix-affinity")
# scheduler: the engine's own Scheduler per replica (the reference); fast: fast_replica.py's aggregate model
REPLICA_MODELS = ("scheduler", "fast")


@dataclass
class SimConfig:
    """A fleet of num_gpus // (tp x pp) identical replicas behind one router. Engine fields keep the engine's
    defaults and names; slo_* turn the server's --slo-ttft-ms/--slo-tpot-ms on (scheduling, admission and
    shedding); goodput_* are the targets the report counts against (W3's)."""

    model: str = "llama-3.1-8b"
    gpu: str = "H100-SXM"
    num_gpus: int = 1
    tp: int = 1
    # pipeline stages per replica (each tp GPUs holding a contiguous slice of the layers; pipeline.py), and the
    # steps a replica keeps in flight over them (the engine's --pipeline-depth; 0: one per stage)
    pp: int = 1
    pipeline_depth: int = 0
    # the host's time per pipelined step on the first stage (scheduling, inputs, outputs: pipeline.py); None:
    # the calibration section's pipeline.host_step_ms
    pp_host_step_s: float | None = None
    # and the rest of a step's round trip through the host, which delays the step but keeps no one busy (None: the
    # calibration's pipeline.round_trip_ms)
    pp_round_trip_s: float | None = None
    # the engine's --pp-token-handoff (TP = 1): the last stage sends each step's sampled ids to the first on the
    # device, and a sequence runs again pp steps after its last without its token back on the host (pipeline.py)
    pp_token_handoff: bool = False
    # the engine's --pp-layer-partition: layers per stage (None: the even split, the first stages take the rest)
    pp_layer_partition: tuple[int, ...] | None = None
    # MESHSERVE_TP_FUSED_NORM: "" off, "pull" or "push": each TP all-reduce fused with the residual add and the
    # next RMSNorm (step_cost.FusedNormSaving, the calibration's tp.fused_norm_* tables)
    tp_fused_norm: str = ""
    router: str = "least-outstanding"
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None
    slo_prefill_chunk: int = SchedulerConfig.slo_prefill_chunk
    goodput_ttft_s: float = 1.0
    goodput_tpot_s: float = 0.05
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    num_blocks: int | None = None  # None: what the planner's memory model leaves for KV
    enable_prefix_caching: bool | None = None  # None: on when the trace shares prefixes (else it cannot hit)
    max_queue_len: int = 1024  # the server's --max-queue-len
    max_attempts: int = 3  # the router's tries per request (a 429 goes to another replica)
    # the router's --max-outstanding: past that many requests in flight a new one gets 503 at once
    # (router_admission.py); None: no limit (off, as before)
    max_outstanding: int | None = None
    # HTTP, tokenization and the hop to the engine core: a request reaches its replica this long after it was
    # sent, and the client's TTFT includes it (0: the engine's own view)
    frontend_latency_s: float = 0.0
    # a fixed latency inside the server, between the API process's intake and the core: the hop, and with async
    # scheduling the step a request taken in between steps waits before one can schedule it (the core decides
    # step k + 1 before step k's outputs are read). The server's own TTFT clock (its admission margin's errors)
    # counts it and its 429s do not: the validation replays put their fitted fixed latency here, since the
    # measured 429s came back in 4-7 ms p50 (frontend.py); 0: none
    core_latency_s: float = 0.0
    # the API process of each replica as a CPU queue (frontend.py): seconds per request and per streamed
    # token (0, 0: no queue, the engine's own view; the CLI defaults to FRONTEND_H200)
    frontend_request_s: float = 0.0
    frontend_token_s: float = 0.0
    frontend_refusal_s: float = 0.0  # a 429 from the gate (0: a whole request's intake)
    api_server_count: int = 1  # API processes per replica (`meshserve serve --api-server-count`)
    # with slo_ttft_s and a front-end queue: each API process answers 429 itself, before parsing, when its own
    # delays plus the core's queue wait break the target (the server's middleware since 1aa067c; frontend.py);
    # False: the server before it (every 429 after a full intake, the clock from the handler)
    frontend_gate: bool = True
    # with the gate: each API process stalls in full garbage collections as servers before 054ccb3 did
    # (frontend_stalls.py, STALLS_H200, drawn per replica and process from seed); False: the server since
    frontend_stalls: bool = False
    # the router process in front of the replicas as one CPU queue (router_node.py): seconds per request, per
    # 429 from a replica and per streamed event (0, 0: the router is a policy only, as `serve
    # --data-parallel-size N` with its internal back end: no router hop); needs the front-end queue
    router_request_s: float = 0.0
    router_event_s: float = 0.0
    router_refusal_s: float = 0.0
    hardware_file: str | None = None
    # how each replica is simulated (REPLICA_MODELS); "fast" takes the reference where it does not apply
    replica_model: str = "scheduler"
    # the engine's --enable-expert-parallel: a MoE model's experts spread whole over the replica's TP ranks (each
    # holds num_experts / tp of them) instead of each expert sliced tp ways; no effect on a dense model (as the
    # engine). The exchange is priced as TP's all-reduces (the engine's captured decode steps sum the ranks' parts
    # with one; its eager steps dispatch and combine by all-to-all of the same order of bytes)
    enable_expert_parallel: bool = False
    # the weights' and the KV cache's dtypes, as `meshserve plan --dtype / --kv-dtype` and the engine's
    # --quantization / --kv-cache-dtype: the planner's bytes for memory (KV blocks), the steps' weight and KV
    # terms (step_cost.StepCost) and the KV a disaggregated prompt sends. None: the checkpoint's weights
    weight_dtype: str | None = None
    kv_dtype: str = "bf16"
    # the step-time weights: a section of calibration.toml ("default": the model's own fit where it has one,
    # calibration_section)
    calibration: str = "default"
    # step-time noise and host gaps between steps from that section's step_noise table (step_noise.py), drawn
    # per replica from seed; off: every step lasts its prediction (closed-form cases stay exact)
    step_noise: bool = False
    seed: int = 0
    # prefill/decode disaggregation (disaggregated.py): (P, D) of the num_replicas replicas run prompts (and each
    # first token) or decodes; None: every replica colocated. The KV of each prompt crosses a link of
    # kv_link_gb_s (None: the catalog's GPU link, e.g. NVLink, per TP rank) after kv_transfer_latency_s (None: the
    # catalog's link latency) per transfer
    disaggregation: tuple[int, int] | None = None
    kv_link_gb_s: float | None = None
    kv_transfer_latency_s: float | None = None
    # replicas that die and come back (failures.py): (replica index, seconds at which it is killed, seconds until
    # its restart answers /ready); the router ejects it at once and re-admits it after its health probes
    replica_failures: tuple[tuple[int, float, float], ...] = ()
    # replicas that stop answering a while and go on where they were (failures.py, `--hang-replica R@T+D`, as a
    # SIGSTOP then SIGCONT): (replica index, seconds at which it stops, seconds it stays stopped)
    replica_hangs: tuple[tuple[int, float, float], ...] = ()
    # the router's health checks and read timeout as `meshserve router` takes them (--health-interval, ...): when
    # a failed or hung replica is ejected and re-admitted, and when a hung one's requests time out
    health_interval_s: float = RouterConfig.health_interval_s
    health_timeout_s: float = RouterConfig.health_timeout_s
    fail_threshold: int = RouterConfig.fail_threshold
    recover_threshold: int = RouterConfig.recover_threshold
    read_timeout_s: float = RouterConfig.read_timeout_s

    def validate(self) -> None:
        self._validate_numbers()
        # kills and hangs alike: (replica, start, duration, flag, what the duration is)
        outages = sorted((*((r, t, d, "--fail-replica", "downtime") for r, t, d in self.replica_failures),
                          *((r, t, d, "--hang-replica", "hang") for r, t, d in self.replica_hangs)))
        for replica, at_s, span_s, flag, what in outages:
            # NaN or inf (float() takes them) hung the run or ended it in a numpy traceback
            if not (0 <= replica < self.num_replicas and 0 <= at_s < math.inf and 0 < span_s < math.inf):
                raise InvalidArgumentError(
                    f"{flag} {replica}@{at_s:g}+{span_s:g}: the replica must be one of 0-{self.num_replicas - 1}, "
                    f"the time >= 0 and the {what} > 0 (both finite)", param=flag[2:].replace("-", "_"))
        for (r0, t0, d0, f0, _), (r1, t1, d1, f1, _) in itertools.pairwise(outages):
            if r0 == r1 and t1 <= t0 + d0:
                raise InvalidArgumentError(f"{f1} {r1}@{t1:g}+{d1:g}: replica {r1} is still down then (from "
                                           f"{f0} {r0}@{t0:g}+{d0:g})", param=f1[2:].replace("-", "_"))
        if self.weight_dtype is not None and self.weight_dtype not in WEIGHT_DTYPE_BYTES:
            raise InvalidArgumentError(f"--dtype must be one of {', '.join(sorted(WEIGHT_DTYPE_BYTES))}, got "
                                       f"{self.weight_dtype!r}", param="dtype")
        if self.enable_expert_parallel and self.tp > 1:  # as the engine refuses it (models/moe_config.py)
            experts = self.model_spec().num_experts
            if experts and experts % self.tp:
                raise InvalidArgumentError(f"--enable-expert-parallel: {experts} experts do not divide evenly over "
                                           f"--tp {self.tp}", param="enable_expert_parallel")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise InvalidArgumentError(f"--kv-dtype must be one of {', '.join(sorted(KV_DTYPE_BYTES))}, got "
                                       f"{self.kv_dtype!r}", param="kv_dtype")
        if self.tp < 1 or self.pp < 1:
            raise InvalidArgumentError("--tp and --pp must be >= 1", param="tp")
        if self.num_gpus < 1 or self.num_gpus % self.gpus_per_replica:
            what = "--tp" if self.pp == 1 else "--tp x --pp"
            raise InvalidArgumentError(f"--num-gpus ({self.num_gpus}) must be a positive multiple of {what} "
                                       f"({self.gpus_per_replica})", param="num_gpus")
        if self.num_replicas > MAX_REPLICAS:  # --num-gpus 100000000 ran for hours building replicas
            raise InvalidArgumentError(f"--num-gpus {self.num_gpus:,} is {self.num_replicas:,} replicas; at most "
                                       f"{MAX_REPLICAS:,}", param="num_gpus")
        model = self.model_spec()
        # the planner's rules for a layout the engine can shard (heads, KV heads, MLP and expert widths divisible
        # by TP, PP <= layers): --tp 3 of a 64-head model was simulated as if it ran. Nodes are not checked: the
        # simulator prices TP on the catalog's link whatever the GPUs per node
        problem = structural_problem(model, self.layout, gpus_per_node=self.tp, nodes=self.pp, pp_in_node=True)
        if problem:
            flags = f"--tp {self.tp}" + (f" --pp {self.pp}" if self.pp > 1 else "")
            raise InvalidArgumentError(f"{flags}: {problem}", param="tp")
        if self.max_model_len > model.max_position_embeddings:  # as serve and `meshserve plan` refuse it
            raise InvalidArgumentError(f"--max-model-len {self.max_model_len:,} exceeds {model.name}'s context of "
                                       f"{model.max_position_embeddings:,} tokens", param="max_model_len")
        if self.pipeline_depth and self.pipeline_depth < self.pp:  # as the engine refuses it (EngineArgs)
            raise InvalidArgumentError(f"--pipeline-depth must be 0 (one step per stage) or >= --pp ({self.pp}), "
                                       f"got {self.pipeline_depth}", param="pipeline_depth")
        if self.pp > 1 and self.step_noise:
            raise InvalidArgumentError("step-time noise is not modelled with pipeline stages (pipeline.py)",
                                       param="step_noise")
        if min(self.pp_host_step_s or 0.0, self.pp_round_trip_s or 0.0) < 0:
            raise InvalidArgumentError("the pipeline host cost must be >= 0", param="pp_host_step_ms")
        if self.pp_token_handoff and (self.pp == 1 or self.tp != 1):  # as the engine refuses it (EngineArgs)
            raise InvalidArgumentError("--pp-token-handoff needs --pp > 1 and --tp 1", param="pp_token_handoff")
        if self.pp_layer_partition is not None:
            layers = self.model_spec().num_layers
            if (len(self.pp_layer_partition) != self.pp or min(self.pp_layer_partition) < 1
                    or sum(self.pp_layer_partition) != layers):
                raise InvalidArgumentError(f"--pp-layer-partition {list(self.pp_layer_partition)} must list {self.pp} "
                                           f"stages of >= 1 layer summing to {layers}", param="pp_layer_partition")
        if self.tp_fused_norm not in ("", "pull", "push"):
            raise InvalidArgumentError("--tp-fused-norm must be off, pull or push", param="tp_fused_norm")
        if self.frontend_request_s < 0 or self.frontend_token_s < 0 or self.frontend_refusal_s < 0:
            raise InvalidArgumentError("front-end costs must be >= 0", param="frontend_request_ms")
        if min(self.router_request_s, self.router_event_s, self.router_refusal_s) < 0:
            raise InvalidArgumentError("router costs must be >= 0", param="router_request_ms")
        if self.router_costs.enabled and not self.frontend_costs.enabled:
            raise InvalidArgumentError("the router node relays what the replicas' API processes stream: it needs "
                                       "the front-end queue (--frontend-request-ms / --frontend-token-us > 0)",
                                       param="router_node")
        # each API process is a queue built up front: --api-server-count 100000000 ran for hours (a host has a few
        # hundred cores at most)
        if not 1 <= self.api_server_count <= MAX_API_SERVERS:
            raise InvalidArgumentError(f"--api-server-count must be 1 to {MAX_API_SERVERS:,}, got "
                                       f"{self.api_server_count}", param="api_server_count")
        if self.replica_model not in REPLICA_MODELS:
            raise InvalidArgumentError(f"--replica-model must be one of {', '.join(REPLICA_MODELS)}",
                                       param="replica_model")
        if self.disaggregation is not None:
            self._validate_disaggregation()
        if self.router not in ROUTER_POLICIES:
            raise InvalidArgumentError(f"--router must be one of {', '.join(ROUTER_POLICIES)}", param="router")

    def _validate_numbers(self) -> None:
        """Counts and times the scheduler would otherwise take (an assertion deep in the run, a NaN report)."""
        at_least_one = {"--max-num-seqs": self.max_num_seqs, "--max-num-batched-tokens": self.max_num_batched_tokens,
                        "--max-model-len": self.max_model_len, "--fail-threshold": self.fail_threshold,
                        "--recover-threshold": self.recover_threshold,
                        "--num-blocks": 1 if self.num_blocks is None else self.num_blocks}
        for flag, value in at_least_one.items():
            if value < 1:
                raise InvalidArgumentError(f"{flag} must be >= 1, got {value}", param=flag[2:])
        if self.max_outstanding is not None and self.max_outstanding < 1:
            raise InvalidArgumentError(f"--max-outstanding must be >= 1, got {self.max_outstanding}",
                                       param="max_outstanding")
        if self.max_queue_len < 0:  # 0: every request refused (a model of a full server)
            raise InvalidArgumentError(f"--max-queue-len must be >= 0, got {self.max_queue_len}", param="max_queue_len")
        if self.slo_prefill_chunk < 0:
            raise InvalidArgumentError(f"--slo-prefill-chunk must be >= 0, got {self.slo_prefill_chunk}",
                                       param="slo_prefill_chunk")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise InvalidArgumentError(f"--seed must be >= 0, got {self.seed}", param="seed")
        positive = {"--slo-ttft-ms": self.slo_ttft_s, "--slo-tpot-ms": self.slo_tpot_s,
                    "--ttft-slo": self.goodput_ttft_s, "--tpot-slo": self.goodput_tpot_s,
                    "--kv-link-gb-s": self.kv_link_gb_s, "--health-interval": self.health_interval_s,
                    "--health-timeout": self.health_timeout_s, "--read-timeout": self.read_timeout_s}
        for flag, value in positive.items():
            if value is not None and not value > 0:  # NaN too
                given = value * 1e3 if flag.endswith("-ms") else value  # the flag's unit: -1 ms, not -0.001
                raise InvalidArgumentError(f"{flag} must be > 0, got {given}", param=flag[2:])
        at_least_zero = {"--frontend-latency-ms": self.frontend_latency_s, "--core_latency_s": self.core_latency_s,
                         "--frontend-request-ms": self.frontend_request_s,
                         "--frontend-token-us": self.frontend_token_s,
                         "--frontend-refusal-ms": self.frontend_refusal_s,
                         "--router-request-ms": self.router_request_s, "--router-event-us": self.router_event_s,
                         "--router-refusal-ms": self.router_refusal_s, "--pp-host-step-ms": self.pp_host_step_s,
                         "--pp-round-trip-ms": self.pp_round_trip_s,
                         "--kv-transfer-latency-us": self.kv_transfer_latency_s}
        for flag, value in at_least_zero.items():
            if value is not None and not 0 <= value < math.inf:
                raise InvalidArgumentError(f"{flag} must be >= 0 and finite", param=flag[2:])

    def _validate_disaggregation(self) -> None:
        p, d = self.disaggregation
        if p < 1 or d < 1 or p + d != self.num_replicas:
            raise InvalidArgumentError(f"--disaggregation {p}:{d}: need P >= 1 prefill and D >= 1 decode replicas, "
                                       f"P + D = the {self.num_replicas} replicas of the layout",
                                       param="disaggregation")
        if self.pp > 1 or self.router_costs.enabled:
            raise InvalidArgumentError("--disaggregation is not modelled with pipeline stages or the router node",
                                       param="disaggregation")
        if (self.kv_link_gb_s is not None and self.kv_link_gb_s <= 0) or (self.kv_transfer_latency_s or 0.0) < 0:
            raise InvalidArgumentError("--kv-link-gb-s must be > 0 and --kv-transfer-latency-us >= 0",
                                       param="kv_link_gb_s")

    @property
    def frontend_costs(self) -> FrontEndCosts:
        return FrontEndCosts(self.frontend_request_s, self.frontend_token_s, self.frontend_refusal_s)

    @property
    def frontend_stall_table(self) -> FrontEndStalls | None:
        """The API processes' stalls the replicas draw (frontend_stalls.py), None with frontend_stalls off."""
        return STALLS_H200 if self.frontend_stalls else None

    @property
    def calibration_section(self) -> str:
        """The calibration.toml fit this simulation takes: `calibration`, with "default" the GPU's or the model's
        own fit where calibration.toml lists one (step_cost.calibration_for)."""
        return calibration_for(self.calibration, find_preset(self.model) or self.model, self.gpu_spec().name)

    @property
    def router_costs(self) -> RouterCosts:
        return RouterCosts(self.router_request_s, self.router_event_s, self.router_refusal_s)

    @property
    def gpus_per_replica(self) -> int:
        return self.tp * self.pp

    @property
    def num_replicas(self) -> int:
        return self.num_gpus // self.gpus_per_replica

    @property
    def steps_in_flight(self) -> int:
        """Steps a replica keeps in flight (the engine's ParallelConfig.pipeline_steps_in_flight): 0 without
        pipeline stages."""
        parallel = ParallelConfig(pipeline_parallel_size=self.pp, pipeline_depth=self.pipeline_depth)
        return parallel.pipeline_steps_in_flight

    @property
    def layout(self) -> Layout:
        ep = self.tp if self.enable_expert_parallel and self.tp > 1 and self.model_spec().is_moe else 1
        return Layout(tp=self.tp, pp=self.pp, ep=ep)

    def gpu_spec(self) -> GpuSpec:
        return get_gpu(self.gpu, load_catalog(self.hardware_file))

    def model_spec(self) -> ModelSpec:
        return load_model(self.model)

    def weights_dtype(self, model: ModelSpec) -> str:
        """The weights' dtype: weight_dtype, else what the checkpoint stores (as `meshserve plan`)."""
        return self.weight_dtype or model.checkpoint_dtype

    def kv_blocks(self, model: ModelSpec, gpu: GpuSpec) -> int:
        """KV blocks per replica: the planner's room for KV beside weights, activations and overhead."""
        if self.num_blocks is not None:
            return self.num_blocks
        mem = memory_per_gpu(model, self.layout, gpu, 0, weight_dtype=self.weights_dtype(model),
                             kv_dtype=self.kv_dtype, max_batched_tokens=self.max_num_batched_tokens,
                             max_num_seqs=self.max_num_seqs, gpu_memory_utilization=self.gpu_memory_utilization)
        blocks = mem.max_kv_tokens // self.block_size
        if blocks * self.block_size < self.max_model_len:
            raise InvalidArgumentError(f"{self.model} with {self.layout.label} leaves KV room for {mem.max_kv_tokens} "
                                       f"tokens on {gpu.name}: less than one {self.max_model_len}-token sequence",
                                       param="tp")
        return blocks

    def engine_configs(self, num_blocks: int, prefix_caching: bool) -> tuple[SchedulerConfig, CacheConfig]:
        sched = SchedulerConfig(max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                                max_model_len=self.max_model_len, async_scheduling=False,
                                slo_ttft_s=self.slo_ttft_s, slo_tpot_s=self.slo_tpot_s,
                                slo_prefill_chunk=self.slo_prefill_chunk, pipeline_depth=self.steps_in_flight)
        cache = CacheConfig(block_size=self.block_size, enable_prefix_caching=prefix_caching, num_blocks=num_blocks)
        return sched, cache
