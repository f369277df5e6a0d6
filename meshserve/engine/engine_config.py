"""Resolves user EngineArgs into a validated EngineConfig plus the ModelSource to load."""

from __future__ import annotations

import logging
import os

import torch

from meshserve.config import (
    CacheConfig,
    EngineArgs,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.engine.args_check import check_parallel_split
from meshserve.errors import InvalidArgumentError
from meshserve.layers.quantization import check_quant_shapes, resolve_quant_config
from meshserve.models.embedded import GENERATION_DEFAULTS as EMBEDDED_GENERATION_DEFAULTS
from meshserve.models.generation_defaults import generation_overrides, load_generation_defaults
from meshserve.models.loader import ModelSource, resolve_model_source
from meshserve.models.registry import resolve_model_class
from meshserve.spec_decode.config import parse_speculative_config

logger = logging.getLogger(__name__)


def _resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgumentError("device: CUDA was asked for but no GPU is visible", param="device")
    return device


def _resolve_dtype(dtype: str, hf_config, device: str) -> str:
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return "float32"  # bf16/fp16 matmuls are slow on most CPUs and the tests compare in fp32
    cfg = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "")
    return "float16" if "float16" in cfg and "bfloat16" not in cfg else "bfloat16"


def create_engine_config(args: EngineArgs) -> tuple[EngineConfig, ModelSource]:
    args.validate()
    source = resolve_model_source(args.model, args.load_format, args.tokenizer)
    for key, value in args.hf_overrides.items():
        setattr(source.hf_config, key, value)
    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, source.hf_config, device)

    model_max = getattr(source.hf_config, "max_position_embeddings", None) or 2048
    max_model_len = args.max_model_len or model_max
    if max_model_len > model_max:
        raise InvalidArgumentError(
            f"max_model_len ({max_model_len}) exceeds the model's max_position_embeddings ({model_max})",
            param="max_model_len")
    if args.max_num_batched_tokens is not None:
        batched = args.max_num_batched_tokens
    else:
        batched = 8192 if args.enable_chunked_prefill else max(max_model_len, 8192)
    if not args.enable_chunked_prefill and batched < max_model_len:
        raise InvalidArgumentError(
            f"max_num_batched_tokens ({batched}) is smaller than max_model_len ({max_model_len}); "
            "enable chunked prefill or raise it", param="max_num_batched_tokens")

    resolve_model_class(source.hf_config)  # unsupported architectures fail here, with their name
    # bad weight formats fail here, in one line, before any process starts
    quant_config = resolve_quant_config(source.hf_config, args.quantization,
                                        "dummy" if source.weights_dir is None else "auto")
    check_quant_shapes(quant_config, source.hf_config, args.tensor_parallel_size)
    check_parallel_split(source.hf_config, args.tensor_parallel_size, args.pipeline_parallel_size,
                         args.pp_layer_partition, args.enable_expert_parallel)
    model_dir = source.weights_dir or (args.model if args.model and os.path.isdir(args.model) else None)
    generation_defaults = load_generation_defaults(
        model_dir, args.generation_config, EMBEDDED_GENERATION_DEFAULTS if args.model is None else None)
    generation_defaults.update(generation_overrides(args.override_generation_config))  # vLLM: even with "vllm"
    if args.kv_cache_dtype.startswith("fp8") and getattr(source.hf_config, "kv_lora_rank", None):
        raise InvalidArgumentError("kv_cache_dtype fp8 is not supported for MLA (DeepSeek) models yet: their "
                                   "latent cache stays in the model dtype", param="kv_cache_dtype")
    model_config = ModelConfig(
        model=source.name, tokenizer=source.tokenizer_dir or "", hf_config=source.hf_config, dtype=dtype,
        max_model_len=max_model_len, load_format=args.load_format, seed=args.seed, quantization=args.quantization,
        generation_defaults=generation_defaults,
    )
    parallel_config = ParallelConfig(
        tensor_parallel_size=args.tensor_parallel_size, pipeline_parallel_size=args.pipeline_parallel_size,
        pp_layer_partition=args.pp_layer_partition, pipeline_depth=args.pipeline_depth,
        distributed_executor_backend=args.distributed_executor_backend, nnodes=args.nnodes,
        node_rank=args.node_rank, master_addr=args.master_addr, master_port=args.master_port,
        distributed_timeout_s=args.distributed_timeout_s,
        disable_custom_all_reduce=args.disable_custom_all_reduce,
        enable_expert_parallel=args.enable_expert_parallel, pp_token_handoff=args.pp_token_handoff)
    config = EngineConfig(
        model_config=model_config,
        cache_config=CacheConfig(
            block_size=args.block_size, gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_kv_cache_bytes=args.cpu_kv_cache_bytes, num_gpu_blocks_override=args.num_gpu_blocks_override,
            enable_prefix_caching=args.enable_prefix_caching, cache_dtype=args.kv_cache_dtype,
            kv_offloading_size=args.kv_offloading_size, kv_offloading_disk_path=args.kv_offloading_disk_path,
            kv_offloading_disk_size=args.kv_offloading_disk_size, kv_offloading_verify=args.kv_offloading_verify,
        ),
        scheduler_config=SchedulerConfig(
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=batched, max_model_len=max_model_len,
            enable_chunked_prefill=args.enable_chunked_prefill, async_scheduling=args.async_scheduling,
            scheduling_policy=args.scheduling_policy,
            slo_ttft_s=args.slo_ttft_ms / 1e3 if args.slo_ttft_ms else None,
            slo_tpot_s=args.slo_tpot_ms / 1e3 if args.slo_tpot_ms else None,
            slo_shed_late=args.slo_shed_late, slo_prefill_chunk=args.slo_prefill_chunk, step_trace_path=args.step_trace,
            preemption_mode=args.preemption_mode,
            # stages pipeline their steps only with async scheduling (EngineCore._step_pipelined)
            pipeline_depth=parallel_config.pipeline_steps_in_flight if args.async_scheduling else 0,
        ),
        parallel_config=parallel_config,
        device=device,
        enforce_eager=args.enforce_eager,
        max_cudagraph_tokens=args.max_cudagraph_tokens,
        speculative_config=parse_speculative_config(args.speculative_config),
        kv_transfer_config=parse_kv_transfer_config(args.kv_transfer_config),
    )
    if config.speculative_config is not None and config.speculative_config.uses_draft_model:
        from meshserve.spec_decode.drafters import check_drafter

        check_drafter(config.speculative_config, source.hf_config, max_model_len, args.tensor_parallel_size,
                      args.pipeline_parallel_size, source.tokenizer_dir)
    return config, source
