"""What crosses the line between the front end and the engine core: typed msgspec structs.

The core knows token ids only. A request goes in as an `EngineCoreRequest` (ids + sampling parameters, n = 1:
the front end fans n > 1 out into n core requests); after every step the core sends one `EngineCoreOutputs`
holding only what is new (each token once), the errors of requests it refused, and its counters. The same
objects are passed as they are inside one process and encoded with msgpack between processes.
"""

from __future__ import annotations

import msgspec

from meshserve.engine.startup_timeline import Segment
from meshserve.errors import MeshserveError
from meshserve.sampling import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True):
    """One sequence to generate: validated and tokenized by the front end."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams  # n == 1; _all_stop_token_ids already holds EOS unless ignore_eos
    max_tokens: int  # resolved: params.max_tokens, or what fits in max_model_len
    arrival_time: float = 0.0
    priority: int = 0  # lower runs first under --scheduling-policy priority
    slo_ttft_s: float | None = None  # this request's targets (None: the server's)
    slo_tpot_s: float | None = None


class TokenLogprobs(msgspec.Struct, array_like=True):
    """Logprob information of one position: the token taken, its rank, and the top alternatives (ids only)."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """What one request gained in one step. Fields left at their default are not sent."""

    request_id: str
    new_token_ids: list[int] = []
    finish_reason: str | None = None  # "stop" (a stop token) | "length"; the front end decides stop strings
    stop_reason: int | None = None  # the stop token id that ended it (None for EOS)
    new_logprobs: list[TokenLogprobs] | None = None  # one per new token, when logprobs were asked
    new_prompt_logprobs: list[TokenLogprobs] | None = None  # prompt positions scored in this step, in order
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache (on the first token's output)
    # (queued, first scheduled): time.monotonic() when the core took it in and when a step first included it, on
    # the first token's output only (one field: an array_like struct sends every field, defaults as nil bytes)
    first_times: tuple[float | None, float | None] | None = None
    # a producer's finished request whose KV is held for a consumer: the decode leg's handle (transfer id, this
    # kv rank, the held block ids), as vLLM's prefill answers carry kv_transfer_params
    kv_transfer_params: dict | None = None
    # of num_cached_tokens, those that came from outside this core's GPU cache: KV offload tiers, a disaggregated
    # prefill's transfer (vLLM's num_external_cached_tokens; on the first token's output)
    num_external_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class RequestError(msgspec.Struct, array_like=True, omit_defaults=True):
    """A request the core refused; rebuilt into the meshserve error of the same class by the front end."""

    request_id: str
    error_type: str
    message: str
    param: str | None = None


class SchedulerStats(msgspec.Struct, omit_defaults=True):
    """The core's counters after a step (published with every step: the front end never has to ask)."""

    num_running: int = 0
    num_waiting: int = 0
    num_waiting_for_grammar: int = 0  # of num_waiting: requests whose grammar still compiles (vLLM's deferred)
    num_waiting_for_kv: int = 0  # not in num_waiting: requests whose prompt KV a disaggregated prefill sends
    kv_cache_usage: float = 0.0
    num_blocks: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_hit_rate: float = 0.0
    prefix_cache_restored_hits: int = 0  # of prefix_cache_hits: tokens restored from a KV offload tier
    # vLLM's external_prefix_cache_*: prompt tokens looked up past the GPU prefix cache (in the KV offload tiers, or
    # sent by a disaggregated prefill) at first admissions, and those found there
    prefix_cache_external_queries: int = 0
    prefix_cache_external_hits: int = 0
    num_preemptions: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    pp_bubble: float = 0.0
    num_shed: int = 0  # queued requests dropped because their time-to-first-token target could not be met
    queue_wait_s: float = 0.0  # predicted wait of a request joining the queue now
    prefill_s_per_token: float = 0.0  # predicted prefill time per prompt token (full chunks)
    step_time_predicted_s: float = 0.0  # the last measured step: what the step-time model predicted
    step_time_actual_s: float = 0.0  # and what it took on the device
    step_time_model_error: float = 0.0  # recent mean |predicted - actual| / actual
    # speculative decoding (cumulative): verify rows, proposed tokens, accepted ones, accepted by position
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_num_accepted_tokens_per_pos: list[int] = []
    # KV offload tiers (engine/kv_offload/manager.py KVOffloadStats): blocks and bytes per tier since start
    kv_offload_cpu_hits: int = 0
    kv_offload_disk_hits: int = 0
    kv_offload_cpu_bytes_stored: int = 0
    kv_offload_cpu_bytes_loaded: int = 0
    kv_offload_disk_bytes_written: int = 0
    kv_offload_disk_bytes_read: int = 0
    kv_offload_disk_errors: int = 0
    kv_offload_restores: int = 0
    kv_offload_restore_s: float = 0.0
    kv_offload_swaps_out: int = 0
    kv_offload_swaps_in: int = 0
    kv_offload_cpu_blocks: int = 0
    kv_offload_disk_blocks: int = 0
    kv_offload_link_bytes_per_s: float = 0.0
    kv_offload_store_failures: int = 0
    kv_offload_disk_restores_skipped: int = 0
    kv_offload_disk_blocks_skipped: int = 0
    kv_offload_disk_read_bytes_per_s: float = 0.0
    kv_offload_disk_reads: int = 0
    kv_offload_disk_read_s: float = 0.0
    # prefill/decode disaggregation (disagg/stats.py KVTransferStats): transfers since start, blocks now
    kv_transfer_sent: int = 0
    kv_transfer_sent_bytes: int = 0
    kv_transfer_received: int = 0
    kv_transfer_received_bytes: int = 0
    kv_transfer_received_s: float = 0.0
    kv_transfer_failed: int = 0
    kv_transfer_expired: int = 0
    kv_transfer_held_blocks: int = 0
    kv_transfer_receiving_blocks: int = 0
    kv_transfer_streamed: int = 0  # layer-wise (producer): transfers, their send seconds, those during prefill
    kv_transfer_streamed_s: float = 0.0
    kv_transfer_streamed_overlap_s: float = 0.0
    kv_transfer_latency_buckets: list[int] = []
    # MoE: tokens routed to each expert since start, per MoE layer; only in the steps that read them
    # (engine/expert_load.py), empty otherwise
    expert_load: list[list[int]] = []
    # vLLM's iteration_tokens_total: per batch of outputs, its new tokens plus the prompt tokens computed (not
    # cached) of the sequences whose first token it carries; since start, how many fell in each bucket of
    # ITERATION_TOKENS_BUCKETS (one more for +Inf), then their sum (one list: a field name costs bytes every step)
    iteration_tokens: list[int] = []


# vLLM's buckets of iteration_tokens_total (vllm/v1/metrics/loggers.py)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class EngineCoreOutputs(msgspec.Struct, array_like=True, omit_defaults=True):
    """Everything one core step (or one batch of commands, when idle) tells the front end."""

    outputs: list[EngineCoreOutput] = []
    errors: list[RequestError] = []
    stats: SchedulerStats | None = None
    timestamp: float = 0.0  # time.monotonic() in the core when it was built
    engine_index: int = 0  # data parallel: the core it came from (set by DPCoreClient on receipt, never sent)


class CoreInfo(msgspec.Struct, omit_defaults=True):
    """What the front end needs to know of a started core to validate and process requests itself."""

    model: str
    max_model_len: int
    vocab_size: int
    block_size: int
    num_blocks: int
    max_num_batched_tokens: int
    enable_chunked_prefill: bool
    tokenizer: str | None = None  # folder the front end loads its tokenizer from
    eos_token_ids: list[int] = []  # from the model's config and generation_config (the tokenizer's is added)
    # SamplingParams fields a request leaves unset take these (the model's generation_config.json)
    generation_defaults: dict[str, int | float] = {}
    slo_ttft_s: float | None = None  # the server's service-level targets (requests may set their own)
    slo_tpot_s: float | None = None
    scheduling_policy: str = "fcfs"  # the waiting queue's order: a request's priority counts under "priority" only
    # KV slots a draft model writes past a sequence's tokens a step (SpeculativeConfig.num_lookahead_tokens)
    num_lookahead_tokens: int = 0
    # start-up timeline segments of the core's process and its worker ranks (engine/startup_timeline.py)
    startup: list[Segment] = []
    # vllm:cache_config_info's labels: the KV cache's settings under vLLM's CacheConfig names, as str() values
    cache_config: dict[str, str] = {}

    @property
    def capacity_tokens(self) -> int:
        """The most tokens one request may reach: the pool, less the lookahead slots its last step needs."""
        return self.num_blocks * self.block_size - self.num_lookahead_tokens


def error_to_message(request_id: str, error: BaseException) -> RequestError:
    return RequestError(request_id, type(error).__name__, str(error), getattr(error, "param", None))


def error_from_message(err: RequestError) -> MeshserveError:
    """The meshserve error the message names (MeshserveError when the name is not one of ours)."""
    from meshserve import errors

    cls = getattr(errors, err.error_type, None)
    if not (isinstance(cls, type) and issubclass(cls, MeshserveError)):
        cls = MeshserveError
    if issubclass(cls, errors.InvalidArgumentError):
        return cls(err.message, param=err.param)
    return cls(err.message)
