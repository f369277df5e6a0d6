"""Typed configuration that flows down from the CLI / LLM(...) to every component.

Argument names follow vLLM's EngineArgs so a vLLM user's flags and keyword arguments carry over.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any

from meshserve.disagg.config import KVTransferConfig, parse_kv_transfer_config
from meshserve.errors import InvalidArgumentError
from meshserve.spec_decode.config import SpeculativeConfig, parse_speculative_config
from meshserve.vllm_values import dtype_name

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DTYPES = ("auto", "float32", "float16", "bfloat16")
# "auto" = the model dtype; another 16/32-bit dtype needs the torch attention backend (the Triton kernels keep
# the cache in the model dtype); fp8 (= fp8_e4m3) is float8_e4m3fn with per-tensor scales, in every backend
CACHE_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp8", "fp8_e4m3")
# weight formats (--quantization); the checkpoint's quantization_config is read when this is None
QUANTIZATION_METHODS = ("fp8", "awq", "gptq", "compressed-tensors", "fbgemm_fp8")


@dataclass
class ModelConfig:
    """What model runs and how its weights are read.

    `hf_config` is the transformers config object (LlamaConfig, Qwen3Config, ...); the model code reads
    its fields directly, so every family that transformers describes is described the same way here.
    """

    model: str
    tokenizer: str
    hf_config: Any
    dtype: str  # resolved: float32 | float16 | bfloat16
    max_model_len: int
    load_format: str = "auto"
    seed: int = 0
    quantization: str | None = None  # --quantization (None: whatever the checkpoint's quantization_config says)
    # SamplingParams fields the model's generation_config.json sets (--generation-config), for unset fields
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        hd = getattr(self.hf_config, "head_dim", None)
        return hd or self.hf_config.hidden_size // self.num_heads

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size


@dataclass
class CacheConfig:
    """Paged KV cache shape and budget."""

    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30  # budget for the pool when running on CPU
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    cache_dtype: str = "auto"  # KV cache element type, one of CACHE_DTYPES ("auto" = the model dtype)
    # KV offload tiers (engine/kv_offload/): GiB of (pinned) CPU memory, then a folder of block files
    kv_offloading_size: float | None = None
    kv_offloading_disk_path: str | None = None
    kv_offloading_disk_size: float | None = None
    kv_offloading_verify: bool = False  # debug: crc32 of every block checked on its way back
    num_blocks: int = 0  # filled in by the engine once the pool is sized


@dataclass
class SchedulerConfig:
    """Per-step budgets of the continuous-batching scheduler."""

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    # schedule step n+1 while the GPU runs step n (single-process engines; see EngineCore.step)
    async_scheduling: bool = True
    # "fcfs", or "priority": the queue by (priority, arrival), lowest priority value first (vLLM's order)
    scheduling_policy: str = "fcfs"
    # service-level targets (None: off); per-request targets override them (scheduling_policy.py)
    slo_ttft_s: float | None = None  # time to first token
    slo_tpot_s: float | None = None  # time per output token after the first
    slo_shed_late: bool = True  # drop a queued request once its time-to-first-token target cannot be met
    # with a TPOT target and requests decoding: most prompt tokens one step carries (0: only the target caps it)
    slo_prefill_chunk: int = 1024
    step_trace_path: str | None = None  # a JSON line per step (shape, predicted and measured time), for tuning
    preemption_mode: str = "recompute"  # recompute | swap | auto (swap needs the CPU offload tier)
    # pipeline parallel: steps the engine keeps in flight, each over other sequences and holding up to
    # max_num_seqs of them (0: one step at a time); create_engine_config fills it from the ParallelConfig
    pipeline_depth: int = 0

    @property
    def max_running(self) -> int:
        """Sequences that may run at once: max_num_seqs per step in flight. The scheduler's cap, and what the
        KV pool, the planner and the simulator size for."""
        return self.max_num_seqs * max(1, self.pipeline_depth)


@dataclass
class ParallelConfig:
    """How the model is split across devices and processes (and nodes)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pp_layer_partition: list[int] | None = None
    # steps the engine keeps in flight with pipeline stages (0: one per stage); one more than the stages
    # hides the host's round trip for the oldest step's tokens behind the extra step's compute
    pipeline_depth: int = 0
    distributed_executor_backend: str = "mp"  # mp | ray
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    distributed_timeout_s: float = 60.0
    disable_custom_all_reduce: bool = False  # True: NCCL for every TP all-reduce (no one-shot kernel)
    enable_expert_parallel: bool = False  # MoE experts spread over the TP ranks (else each expert is TP-split)
    # experimental (PP > 1, TP = 1): the last stage sends each step's sampled ids straight to the first stage on
    # the device, so a sequence's next step launches before its token is back on the host
    # (engine/pipeline_stage.py TokenHandoff)
    pp_token_handoff: bool = False

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def pipeline_steps_in_flight(self) -> int:
        """Steps a pipelined engine keeps in flight: 0 without pipeline stages, else pipeline_depth or one per
        stage."""
        if self.pipeline_parallel_size == 1:
            return 0
        return self.pipeline_depth or self.pipeline_parallel_size


@dataclass
class EngineConfig:
    """Everything the engine needs, resolved and validated."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device: str = "cpu"
    enforce_eager: bool = False
    # largest mixed (prefill + decode) step captured in a CUDA graph, in tokens; 0: mixed steps run eagerly.
    # An eager step of an 8B model costs 14-27 ms of host launches on an H200 whatever its size, as much as
    # the GPU time of a 1,000-token step: under W3 the GPU idled 14% of the time with graphs up to 1,024
    max_cudagraph_tokens: int = 2048
    speculative_config: SpeculativeConfig | None = None
    kv_transfer_config: KVTransferConfig | None = None  # prefill/decode disaggregation (disagg/)


# EngineArgs' scalar field types (as annotated: this module's annotations are strings) -> the Python types
# they accept; an int is a float here too, as in vLLM
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {"int": (numbers.Integral,), "float": (numbers.Real,), "bool": (bool,),
                                              "str": (str,)}
_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "True or False", "str": "a string"}


@dataclass
class EngineArgs:
    """User-facing engine arguments (vLLM names). `create_engine_config` resolves them."""

    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    cpu_kv_cache_bytes: int = 1 << 30
    num_gpu_blocks_override: int | None = None
    kv_cache_dtype: str = "auto"  # CacheConfig.cache_dtype
    quantization: str | None = None  # weight format: fp8 | awq | gptq | compressed-tensors | fbgemm_fp8
    kv_offloading_size: float | None = None  # GiB
    kv_offloading_disk_path: str | None = None
    kv_offloading_disk_size: float | None = None  # GiB
    kv_offloading_verify: bool = False
    kv_offloading_backend: str = "native"  # vLLM's: native (meshserve's tiers) | lmcache (refused)
    preemption_mode: str = "recompute"
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    async_scheduling: bool = True
    scheduling_policy: str = "fcfs"
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    slo_shed_late: bool = True
    slo_prefill_chunk: int = 1024
    step_trace: str | None = None
    seed: int = 0
    load_format: str = "auto"
    generation_config: str = "auto"  # auto | vllm | a folder holding generation_config.json
    override_generation_config: dict[str, Any] = field(default_factory=dict)  # its keys, over the above
    enforce_eager: bool = False
    max_cudagraph_tokens: int = 2048  # EngineConfig.max_cudagraph_tokens
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    pp_layer_partition: list[int] | None = None
    pipeline_depth: int = 0  # ParallelConfig.pipeline_depth
    distributed_executor_backend: str = "mp"
    nnodes: int = 1
    node_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int | None = None
    distributed_timeout_s: float = 60.0
    disable_custom_all_reduce: bool = False
    enable_expert_parallel: bool = False
    pp_token_handoff: bool = False  # ParallelConfig.pp_token_handoff (experimental)
    device: str = "auto"
    hf_overrides: dict[str, Any] = field(default_factory=dict)
    # vLLM's keys, as a dict or JSON string (spec_decode/config.py)
    speculative_config: dict[str, Any] | str | SpeculativeConfig | None = None
    # vLLM's keys, as a dict or JSON string (disagg/config.py)
    kv_transfer_config: dict[str, Any] | str | KVTransferConfig | None = None

    def __post_init__(self) -> None:
        # vLLM's spellings: dtype="half" / "float" (its aliases) or a torch dtype; None for a field meshserve
        # types as a plain value means its default, as vLLM's optional arguments do (seed=None is seed 0 in
        # vLLM's V1 engine, block_size / max_num_seqs / enable_prefix_caching=None the defaults)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.type in _SCALAR_TYPES:
                setattr(self, f.name, f.default)
            elif f.type in ("int", "int | None") and isinstance(value, float) and value.is_integer():
                setattr(self, f.name, int(value))  # cpu_kv_cache_bytes=2e9; 1.5 is refused by validate()
        if type(self.dtype).__name__ == "dtype" and str(self.dtype).startswith("torch."):  # torch.float16
            self.dtype = str(self.dtype).removeprefix("torch.")
        if isinstance(self.dtype, str):
            self.dtype = dtype_name(self.dtype)

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def _check_types(self, check) -> None:
        """Each scalar field of the type it is declared with: the range checks compare, and "64" >= 1 would raise
        a bare TypeError (1.5 sequences would run as if it were an integer)."""
        for f in dataclasses.fields(self):
            value, kinds = getattr(self, f.name), _SCALAR_TYPES.get(f.type.removesuffix(" | None"))
            if kinds is None or (value is None and f.type.endswith(" | None")):
                continue
            if bool in kinds:  # 0 and 1 pass for False and True, as they do in vLLM
                ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
            else:
                ok = isinstance(value, kinds) and not isinstance(value, bool)
            check(ok, f.name, f"must be {_TYPE_WORDS[f.type.removesuffix(' | None')]}, got {value!r}")

    def validate(self) -> None:
        def check(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise InvalidArgumentError(f"{param}: {msg}", param=param)

        self._check_types(check)
        check(self.dtype in DTYPES, "dtype", f"must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        check(self.kv_cache_dtype in CACHE_DTYPES, "kv_cache_dtype",
              f"must be one of {', '.join(CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        check(self.quantization is None or self.quantization in QUANTIZATION_METHODS, "quantization",
              f"must be one of {', '.join(QUANTIZATION_METHODS)}, got {self.quantization!r}")
        check(self.load_format in LOAD_FORMATS, "load_format",
              f"must be one of {', '.join(LOAD_FORMATS)}, got {self.load_format!r}")
        check(self.generation_config in ("auto", "vllm")
              or os.path.isfile(os.path.join(self.generation_config, "generation_config.json")),
              "generation_config", f"must be auto, vllm or a folder holding generation_config.json, "
              f"got {self.generation_config!r}")
        check(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
              f"must be a power of two between 1 and 128, got {self.block_size}")
        check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
              f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 1,
              "num_gpu_blocks_override", "must be >= 1")
        check(self.max_num_seqs >= 1, "max_num_seqs", "must be >= 1")
        check(self.max_model_len is None or self.max_model_len >= 1, "max_model_len", "must be >= 1")
        check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
              "max_num_batched_tokens", "must be >= 1")
        check(self.max_cudagraph_tokens >= 0, "max_cudagraph_tokens",
              f"must be >= 0 (0: mixed steps run eagerly), got {self.max_cudagraph_tokens}")
        check(self.cpu_kv_cache_bytes > 0, "cpu_kv_cache_bytes", "must be > 0")
        check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
              f"must be auto, cpu or cuda[:N], got {self.device!r}")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", "must be >= 1")
        check(self.pipeline_parallel_size >= 1, "pipeline_parallel_size", "must be >= 1")
        check(self.pipeline_depth == 0 or self.pipeline_depth >= self.pipeline_parallel_size, "pipeline_depth",
              f"must be 0 (one step per stage) or >= pipeline_parallel_size, got {self.pipeline_depth}")
        check(not self.pp_token_handoff or self.pipeline_parallel_size > 1, "pp_token_handoff",
              "needs pipeline_parallel_size > 1 (it hands tokens from the last stage to the first)")
        check(not self.pp_token_handoff or self.tensor_parallel_size == 1, "pp_token_handoff",
              f"runs with tensor_parallel_size 1 only, got {self.tensor_parallel_size}")
        check(not self.pp_token_handoff or self.async_scheduling, "pp_token_handoff",
              "needs async_scheduling (without it no step is launched before the last one's tokens are back)")
        check(self.distributed_executor_backend in ("mp", "ray"), "distributed_executor_backend",
              f"must be mp or ray, got {self.distributed_executor_backend!r}")
        check(self.nnodes >= 1 and 0 <= self.node_rank < self.nnodes, "node_rank",
              f"must be in [0, nnodes={self.nnodes}), got {self.node_rank}")
        check(self.distributed_timeout_s > 0, "distributed_timeout_s", "must be > 0")
        check(self.master_port is None or 1 <= self.master_port <= 65535, "master_port",
              f"must be in [1, 65535], got {self.master_port}")
        # torch.manual_seed's range: a larger seed fails in the engine process as "Overflow when unpacking long"
        check(-(1 << 63) <= self.seed < (1 << 64), "seed", f"must fit in 64 bits, got {self.seed}")
        check(self.scheduling_policy in ("fcfs", "priority"), "scheduling_policy",
              f"must be fcfs or priority, got {self.scheduling_policy!r}")
        self._validate_offload(check)
        for name in ("slo_ttft_ms", "slo_tpot_ms"):
            value = getattr(self, name)
            check(value is None or value > 0, name, f"must be > 0 milliseconds, got {value}")
        check(self.slo_prefill_chunk >= 0, "slo_prefill_chunk", f"must be >= 0, got {self.slo_prefill_chunk}")
        spec = parse_speculative_config(self.speculative_config)
        check(spec is None or self.pipeline_parallel_size == 1, "speculative_config",
              "speculative decoding does not run with pipeline parallelism yet")
        # vLLM's rule; meshserve runs the draft on the target's ranks either way (the same proposals)
        dtp = spec.draft_tensor_parallel_size if spec is not None else None
        check(dtp in (None, 1, self.tensor_parallel_size), "speculative_config",
              f"draft_tensor_parallel_size must be 1 or tensor_parallel_size ({self.tensor_parallel_size}), "
              f"got {dtp}")
        check(parse_kv_transfer_config(self.kv_transfer_config) is None
              or self.tensor_parallel_size * self.pipeline_parallel_size == 1, "kv_transfer_config",
              "disaggregation runs on one device per instance for now (tensor and pipeline parallel 1)")

    def _validate_offload(self, check) -> None:
        from meshserve.engine.kv_offload.host_memory import GiB, host_memory_bytes

        check(self.kv_offloading_size is None or self.kv_offloading_size > 0, "kv_offloading_size",
              f"must be > 0 GiB, got {self.kv_offloading_size}")
        check(self.kv_offloading_backend == "native", "kv_offloading_backend",
              f"{self.kv_offloading_backend!r} is not supported: meshserve's offload tiers are its own (native: "
              "--kv-offloading-size GiB, --kv-offloading-disk-path DIR)" if self.kv_offloading_backend == "lmcache"
              else f"must be native, got {self.kv_offloading_backend!r}")
        for name in ("kv_offloading_size", "kv_offloading_disk_size"):  # inf passes "> 0", then int() fails
            value = getattr(self, name)
            check(value is None or math.isfinite(value), name, f"must be a finite number of GiB, got {value}")
        # said now, before the model loads, rather than by the allocator (or the OOM killer) later
        host = host_memory_bytes() if self.kv_offloading_size else None
        check(host is None or self.kv_offloading_size * GiB <= host, "kv_offloading_size",
              f"{self.kv_offloading_size} GiB is more than this host's memory ({(host or 0) / GiB:.1f} GiB)")
        check(self.kv_offloading_disk_path is None or bool(self.kv_offloading_size), "kv_offloading_disk_path",
              "needs kv_offloading_size too (the CPU tier stages every block to and from the disk)")
        check(self.kv_offloading_disk_path is None or (self.kv_offloading_disk_size or 0) > 0,
              "kv_offloading_disk_size", "must be > 0 GiB when kv_offloading_disk_path is given")
        check(self.kv_offloading_disk_size is None or self.kv_offloading_disk_path is not None,
              "kv_offloading_disk_path", "must be given with kv_offloading_disk_size")
        check(self.preemption_mode in ("recompute", "swap", "auto"), "preemption_mode",
              f"must be recompute, swap or auto, got {self.preemption_mode!r}")
        check(self.preemption_mode == "recompute" or bool(self.kv_offloading_size), "preemption_mode",
              f"{self.preemption_mode} needs the CPU tier: set kv_offloading_size")
        check(not self.kv_offloading_size or self.tensor_parallel_size * self.pipeline_parallel_size == 1,
              "kv_offloading_size", "KV offloading runs on one device for now (tensor and pipeline parallel 1)")
