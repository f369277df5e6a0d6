"""vLLM's spellings of flag values, so its command lines parse here too: `--max-model-len 32k` (human-readable
integers: k/m/g/t powers of 1000, K/M/G/T powers of 1024, decimals with the former only) and
`--dtype half` / `float` (its aliases of float16 / float32)."""

from __future__ import annotations

import argparse
import re

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# vLLM's engine arguments that ask for what meshserve does anyway, or only tune something meshserve has no
# counterpart for (ignoring them changes no answer): taken and logged as no-ops (`serve` flags and LLM(...) keywords
# alike), with why. The server-only ones are serve/vllm_flag_tables.py's SERVER_NO_OP.
_KERNELS = "a kernel choice of vLLM's: meshserve has kernels of its own (answers are the same)"
_COMPILE = ("meshserve does not torch.compile; CUDA graphs are on unless --enforce-eager (vLLM's -O0), their "
            "largest mixed step is --max-cudagraph-tokens")
_LOADING = ("weight-loading speed only: meshserve reads the model folder's top-level *.safetensors (or the .gguf "
            "file) itself")
_METRICS = "metrics, tracing or logging detail of vLLM's: meshserve's own are /metrics, --request-log, --step-trace"
_SCHEDULING = ("a scheduler tuning of vLLM's: meshserve's scheduler has its own (--max-num-seqs, "
               "--max-num-batched-tokens, --slo-*); answers are the same")
_PARALLEL = "tunes a parallel layout or placement of vLLM's: meshserve's -tp / -pp / -ep place ranks themselves"
_MULTIMODAL = "tunes multimodal inputs: meshserve serves text models only (multimodal inputs are refused)"
_HYBRID = "only for Mamba / hybrid / KV-sharing models, which meshserve does not serve"
NO_OP_ARGS = {
    "trust_remote_code": "meshserve never runs a model's own code (it implements the architectures)",
    "disable_log_stats": "meshserve logs no periodic statistics (see /metrics)",
    # model and sampling
    "allow_deprecated_quantization": "--quantization takes the methods meshserve implements, none deprecated",
    "use_fp64_gumbel": "sampling precision of vLLM's kernels: meshserve samples with its own",
    "disable_cascade_attn": "meshserve has no cascade attention",
    "enable_cumem_allocator": "a GPU memory allocator of vLLM's (for sleep mode, not supported)",
    "renderer_num_workers": ("chat templates and tokenization run in the API processes (scale them with "
                             "--api-server-count)"),
    "language_model_only": "meshserve serves the language model only (text models)",
    "additional_config": "settings for vLLM's platform plugins",
    # loading
    "safetensors_load_strategy": _LOADING, "safetensors_prefetch_num_threads": _LOADING,
    "safetensors_prefetch_block_size": _LOADING, "model_loader_extra_config": _LOADING,
    "use_tqdm_on_load": _LOADING, "pt_load_map_location": _LOADING, "max_parallel_loading_workers": _LOADING,
    "ignore_patterns": _LOADING + " (so original/ and other sub-folders are never read)",
    # kernels and compilation
    "attention_backend": _KERNELS, "attention_config": _KERNELS, "moe_backend": _KERNELS,
    "linear_backend": _KERNELS, "gdn_prefill_backend": _KERNELS, "mamba_backend": _KERNELS,
    "kernel_config": _KERNELS, "ir_op_priority": _KERNELS, "enable_flashinfer_autotune": _KERNELS,
    "enable_bf16x3_router_gemm": _KERNELS, "all2all_backend": _KERNELS, "dcp_comm_backend": _KERNELS,
    "optimization_level": _COMPILE, "cudagraph_capture_sizes": _COMPILE, "max_cudagraph_capture_size": _COMPILE,
    "performance_mode": ("tunes vLLM's defaults for latency or throughput: meshserve's are --max-num-seqs, "
                         "--max-num-batched-tokens and --max-cudagraph-tokens"),
    # KV cache and scheduling
    "prefix_caching_hash_algo": "meshserve hashes prefix blocks its own way (the same blocks hit)",
    "prefix_match_unit": "prefix-cache hits land on --block-size boundaries here",
    "max_num_scheduled_tokens": _SCHEDULING, "max_num_partial_prefills": _SCHEDULING,
    "max_long_partial_prefills": _SCHEDULING, "long_prefill_token_threshold": _SCHEDULING,
    "scheduler_reserve_full_isl": _SCHEDULING, "watermark": _SCHEDULING, "prefill_schedule_interval": _SCHEDULING,
    "stream_interval": "each step's tokens are streamed as they come (vLLM's 1); the text is the same",
    # parallelism
    "numa_bind": _PARALLEL, "numa_bind_nodes": _PARALLEL, "numa_bind_cpus": _PARALLEL,
    "enable_ep_weight_filter": _PARALLEL, "enable_dbo": _PARALLEL, "ubatch_size": _PARALLEL,
    "dbo_decode_token_threshold": _PARALLEL, "dbo_prefill_token_threshold": _PARALLEL,
    "disable_nccl_for_dp_synchronization": _PARALLEL, "enable_eplb": _PARALLEL, "eplb_config": _PARALLEL,
    "expert_placement_strategy": _PARALLEL, "ray_workers_use_nsight": _PARALLEL,
    "dcp_kv_cache_interleave_size": _PARALLEL + " (context parallelism is refused)",
    "cp_kv_cache_interleave_size": _PARALLEL + " (context parallelism is refused)",
    "cpu_distributed_timeout_seconds": "one timeout covers every collective here: --distributed-timeout-s",
    # multimodal and hybrid models
    "media_io_kwargs": _MULTIMODAL, "mm_processor_cache_gb": _MULTIMODAL, "mm_processor_cache_type": _MULTIMODAL,
    "mm_shm_cache_max_object_size_mb": _MULTIMODAL, "mm_encoder_tp_mode": _MULTIMODAL,
    "mm_encoder_attn_backend": _MULTIMODAL, "mm_encoder_attn_dtype": _MULTIMODAL,
    "mm_encoder_fp8_scale_path": _MULTIMODAL, "mm_encoder_fp8_scale_save_path": _MULTIMODAL,
    "mm_encoder_fp8_scale_save_margin": _MULTIMODAL, "interleave_mm_strings": _MULTIMODAL,
    "skip_mm_profiling": _MULTIMODAL, "video_pruning_rate": _MULTIMODAL, "mm_tensor_ipc": _MULTIMODAL,
    "mm_ipc_gpu_memory_gb": _MULTIMODAL, "disable_chunked_mm_input": _MULTIMODAL,
    "enable_mamba_cache_stochastic_rounding": _HYBRID, "mamba_cache_philox_rounds": _HYBRID,
    "mamba_cache_dtype": _HYBRID, "mamba_ssm_cache_dtype": _HYBRID, "mamba_block_size": _HYBRID,
    "mamba_cache_mode": _HYBRID, "disable_hybrid_kv_cache_manager": _HYBRID, "kv_sharing_fast_prefill": _HYBRID,
    # observability
    "show_hidden_metrics_for_version": _METRICS, "collect_detailed_traces": _METRICS, "kv_cache_metrics": _METRICS,
    "kv_cache_metrics_sample": _METRICS, "cudagraph_metrics": _METRICS, "enable_mfu_metrics": _METRICS,
    "enable_logging_iteration_details": _METRICS, "enable_layerwise_nvtx_tracing": _METRICS,
    "jit_monitor_mode": _METRICS, "jit_monitor_verbose": _METRICS, "profiler_config": _METRICS,
    "aggregate_engine_logging": _METRICS, "fail_on_environ_validation": "meshserve checks no VLLM_* variables",
    # its backend key only: any other key is refused (serve/vllm_compat_args.py)
    "structured_outputs_config": ("its backend key only (anything else is refused): meshserve's structured outputs "
                                  "have one grammar engine"),
}


def human_int(text: str) -> int:
    """'32k' -> 32000, '32K' -> 32768, '25.6k' -> 25600, '4096' -> 4096."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", value)
    if match:
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        if "." in number:
            raise argparse.ArgumentTypeError(f"{text!r}: no decimals with the binary suffix {suffix} "
                                             f"(did you mean {number}{suffix.lower()}?)")
        return int(number) * _BINARY[suffix]
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 4096, 32k or 32K, got {text!r}") from None


def dtype_name(text: str) -> str:
    """vLLM's dtype aliases to the names meshserve uses (the choices check what remains)."""
    return _DTYPE_ALIASES.get(text, text)
