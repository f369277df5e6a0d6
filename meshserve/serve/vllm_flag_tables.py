"""The tables of `vllm serve`'s flags that meshserve takes without implementing them (data only; the logic that
applies them is vllm_compat_args.py): refused flags with why and what to use instead, flags refused unless they
ask for meshserve's own behaviour, logged no-ops with why, vLLM's short names, aliases of meshserve's own flags,
on-switches vLLM pairs with --no-x, and the speculative-config shorthands."""

from __future__ import annotations

# kinds of flag, as vLLM's parser has them: "switch" (--x), "bool" (--x and --no-x: argparse's BooleanOptionalAction),
# "value", "values" (one or more), "optional" (--x or --x VALUE)
_NO_LORA = "LoRA adapters are not supported yet (merge the adapter into the weights)"
_NO_MULTIMODAL = "multimodal inputs are not supported (text models only)"
_NO_POOLING = "pooling models are not supported (embeddings and scores are not implemented)"
_NO_OFFLOAD = "offloading weights to CPU memory is not supported (use --quantization, or more GPUs with -tp)"
_DP_ONE_NODE = ("not supported: data parallelism runs all --data-parallel-size replicas on one node here; across "
                "nodes, run one meshserve per replica behind `meshserve router`")
_NO_CONTEXT_PARALLEL = "context parallelism is not supported (use -tp / -pp)"
# flag -> (kind, why meshserve refuses it and what to use instead); `--no-x` of a "bool" asks for nothing and passes
REFUSED: dict[str, tuple[str, str]] = {
    "--revision": ("value", "no model hub here: pass the local folder of that revision"),
    "--code-revision": ("value", "not supported: meshserve never runs a model's remote code"),
    "--tokenizer-revision": ("value", "no model hub here: pass --tokenizer FOLDER"),
    "--download-dir": ("value", "meshserve downloads nothing: pass a local folder as the model"),
    "--hf-token": ("optional", "meshserve downloads nothing: pass a local folder as the model"),
    "--hf-config-path": ("value", ("no model hub here: the model folder's config.json is read (change its fields "
                                   "with --hf-overrides)")),
    "--enable-lora": ("bool", _NO_LORA),
    "--lora-modules": ("values", _NO_LORA),
    "--max-loras": ("value", "LoRA adapters are not supported yet"),
    "--max-lora-rank": ("value", "LoRA adapters are not supported yet"),
    "--lora-dtype": ("value", "LoRA adapters are not supported yet"),
    "--max-cpu-loras": ("value", "LoRA adapters are not supported yet"),
    "--fully-sharded-loras": ("bool", "LoRA adapters are not supported yet"),
    "--lora-target-modules": ("values", "LoRA adapters are not supported yet"),
    "--default-mm-loras": ("value", "LoRA adapters are not supported yet"),
    "--enable-tower-connector-lora": ("bool", "LoRA adapters are not supported yet"),
    "--specialize-active-lora": ("bool", "LoRA adapters are not supported yet"),
    "--enable-mixed-moe-lora-format": ("bool", "LoRA adapters are not supported yet"),
    "--enable-moe-shared-loras": ("bool", "LoRA adapters are not supported yet"),
    "--limit-mm-per-prompt": ("value", _NO_MULTIMODAL),
    "--mm-processor-kwargs": ("value", _NO_MULTIMODAL),
    "--allowed-local-media-path": ("value", _NO_MULTIMODAL),
    "--allowed-media-domains": ("values", _NO_MULTIMODAL),
    "--enable-mm-embeds": ("bool", _NO_MULTIMODAL),
    "--mm-encoder-only": ("bool", _NO_MULTIMODAL),
    "--ec-transfer-config": ("value", "encoder-cache transfer is for multimodal models: " + _NO_MULTIMODAL),
    "--enable-prompt-embeds": ("bool", "prompt embeddings are not supported (text and token-id prompts are)"),
    "--pooler-config": ("value", _NO_POOLING),
    "--diffusion-config": ("value", "diffusion language models are not supported"),
    "--swap-space": ("value", ("not supported: vLLM's V1 engine swaps nothing (it preempts by recompute, as "
                               "meshserve does by default); for a CPU tier that preempted sequences swap to, use "
                               "--kv-offloading-size GiB --preemption-mode swap")),
    "--cpu-offload-gb": ("value", _NO_OFFLOAD),
    "--cpu-offload-params": ("values", _NO_OFFLOAD),
    "--offload-params": ("values", _NO_OFFLOAD),
    "--headless": ("switch", "not supported: a node without the API server is --nnodes N --node-rank R (R > 0)"),
    "--grpc": ("switch", "not supported: meshserve serves the OpenAI API over HTTP only"),
    "--enable-ssl-refresh": ("bool", "not supported: certificates are read once at start (restart for new ones)"),
    "--middleware": ("values", "not supported: meshserve imports no ASGI middleware (put a proxy in front)"),
    "--tool-parser-plugin": ("value", ("not supported: meshserve imports no parser plugins (choose a "
                                       "--tool-call-parser)")),
    "--tool-server": ("value", ("not supported: /v1/responses has no built-in tools (MCP or demo tool servers); "
                                "pass function tools in the request")),
    "--enable-per-request-metrics": ("bool", ("not supported: responses carry no timings (see /metrics and "
                                              "--request-log)")),
    "--enable-server-load-tracking": ("bool", "not supported: there is no /load endpoint (see /metrics)"),
    "--enable-tokenizer-info-endpoint": ("bool", ("not supported: there is no /tokenizer_info endpoint (/tokenize "
                                                  "and /detokenize are served)")),
    "--tokens-only": ("bool", ("not supported: vLLM's tokens-in/tokens-out endpoint is not served (token-id "
                               "prompts work on /v1/completions)")),
    "--enable-return-routed-experts": ("bool", "not supported: outputs carry no MoE routing"),
    "--compilation-config": ("value", ("not supported: meshserve does not torch.compile; its CUDA graphs are "
                                       "--enforce-eager and --max-cudagraph-tokens")),
    "--otlp-traces-endpoint": ("value", "OpenTelemetry tracing is not supported (see /metrics and --request-log)"),
    "--quantization-config": ("value", ("not supported: online quantization specs; use --quantization (fp8: online "
                                        "fp8 from 16-bit weights)")),
    "--override-attention-dtype": ("value", ("not supported: attention runs in --dtype (the cache in "
                                             "--kv-cache-dtype)")),
    "--disable-sliding-window": ("bool", ("not supported: a model's sliding window is applied as its config sets it "
                                          "(cap the context with --max-model-len)")),
    "--skip-tokenizer-init": ("bool", ("not supported: the tokenizer is always loaded (token-id prompts still work); "
                                       "a model folder without one takes --tokenizer FOLDER")),
    "--enable-sleep-mode": ("bool", ("not supported: no sleep / wake_up (the engine keeps its GPU memory until it "
                                     "stops)")),
    "--kv-cache-memory-bytes": ("value", ("not supported: size the KV cache with --gpu-memory-utilization or "
                                          "--num-gpu-blocks-override")),
    "--calculate-kv-scales": ("bool", ("not supported: fp8 KV cache scales are 1.0 or the checkpoint's "
                                       "k_scale / v_scale")),
    "--kv-cache-dtype-skip-layers": ("values", "not supported: --kv-cache-dtype applies to every layer"),
    "--kv-events-config": ("value", "not supported: no KV cache events are published"),
    "--weight-transfer-config": ("value", ("not supported: weights are loaded once at start (no updates while "
                                           "serving)")),
    "--reasoning-config": ("value", ("not supported: no thinking_token_budget (reasoning output is split by "
                                     "--reasoning-parser)")),
    "--model-class-overrides": ("value", ("not supported: meshserve imports no model classes (it implements the "
                                          "architectures)")),
    "--logits-processors": ("values", ("not supported: meshserve imports no logits processors (requests may pass "
                                       "logit_bias)")),
    "--io-processor-plugin": ("value", "not supported: meshserve imports no IO processor plugins"),
    "--scheduler-cls": ("value", "not supported: meshserve imports no scheduler classes (see --scheduling-policy)"),
    "--device-ids": ("value", "not supported: choose the GPUs with CUDA_VISIBLE_DEVICES (one GPU: --device cuda:N)"),
    "--enable-elastic-ep": ("bool", "not supported: the expert-parallel layout is fixed at start (-ep with -tp)"),
    "--data-parallel-rank": ("value", _DP_ONE_NODE),
    "--data-parallel-start-rank": ("value", _DP_ONE_NODE),
    "--data-parallel-address": ("value", _DP_ONE_NODE),
    "--data-parallel-rpc-port": ("value", _DP_ONE_NODE),
    "--data-parallel-hybrid-lb": ("bool", _DP_ONE_NODE),
    "--data-parallel-external-lb": ("bool", _DP_ONE_NODE),
    "--data-parallel-multi-port-external-lb": ("switch", _DP_ONE_NODE),
}
# refused flags' vLLM defaults, which ask for nothing and pass (a vLLM script often spells its defaults out); so
# do a "bool" flag's --no-x, and an empty value
ASKS_FOR_NOTHING = {"--cpu-offload-gb": ("0", "0.0"), "--max-loras": ("1",), "--max-lora-rank": ("16",),
                     "--lora-dtype": ("auto",), "--swap-space": ("0", "0.0")}
# flag -> (the values that ask for what meshserve does, refused otherwise with why); each a "value" flag
REFUSED_UNLESS: dict[str, tuple[tuple[str, ...], str]] = {
    "--logprobs-mode": (("raw_logprobs",), "logprobs are those of the raw logits (raw_logprobs, vLLM's default)"),
    "--convert": (("auto", "none"), _NO_POOLING),
    "--config-format": (("auto", "hf"), "the model folder's Hugging Face config.json is read (auto, hf)"),
    "--model-impl": (("auto", "vllm"), "meshserve runs its own implementation of each architecture (auto)"),
    "--worker-cls": (("auto",), "meshserve imports no worker classes"),
    "--worker-extension-cls": (("",), "meshserve imports no worker classes"),
    "--reasoning-parser-plugin": (("",), "meshserve imports no parser plugins (choose a --reasoning-parser)"),
    "--decode-context-parallel-size": (("1",), _NO_CONTEXT_PARALLEL),
    "--prefill-context-parallel-size": (("1",), _NO_CONTEXT_PARALLEL),
    "--data-parallel-size-local": ((), _DP_ONE_NODE),  # accepted equal to --data-parallel-size
    "--offload-backend": (("auto",), _NO_OFFLOAD),
    "--offload-group-size": (("0",), _NO_OFFLOAD),
    "--offload-num-in-group": (("1",), _NO_OFFLOAD),
    "--offload-prefetch-step": (("1",), _NO_OFFLOAD),
}
# vLLM's server-only flags (not LLM(...) keywords) that change no answer here, with why; the engine's are
# vllm_values.NO_OP_ARGS
SERVER_NO_OP = {
    "log_config_file": "meshserve configures its own logging (meshserve --log-level, --uvicorn-log-level)",
    "enable_log_deltas": "--enable-log-outputs logs each finished output whole",
    "log_error_stack": "logging detail only",
    "fingerprint_mode": "responses carry system_fingerprint null (vLLM's none)",
    "fingerprint_value": "responses carry system_fingerprint null (vLLM's none)",
    "data_parallel_supervisor_port": "only for --data-parallel-multi-port-external-lb (refused)",
    "dp_supervisor_probe_interval_s": "only for --data-parallel-multi-port-external-lb (refused)",
    "dp_supervisor_probe_timeout_s": "only for --data-parallel-multi-port-external-lb (refused)",
    "dp_supervisor_probe_failure_threshold": "only for --data-parallel-multi-port-external-lb (refused)",
    "h11_max_incomplete_event_size": "uvicorn's own HTTP parser limits apply",
    "h11_max_header_count": "uvicorn's own HTTP parser limits apply",
    "enable_offline_docs": "/docs loads its scripts from FastAPI's CDN",
    "enable_flash_late_interaction": "only for late-interaction pooling models: " + _NO_POOLING,
}
# every no-op flag and its kind; why: NO_OP_ARGS or SERVER_NO_OP under its name
NO_OP: dict[str, str] = {
    "--log-config-file": "value", "--enable-log-deltas": "bool", "--log-error-stack": "bool",
    "--fingerprint-mode": "value", "--fingerprint-value": "value", "--data-parallel-supervisor-port": "value",
    "--dp-supervisor-probe-interval-s": "value", "--dp-supervisor-probe-timeout-s": "value",
    "--dp-supervisor-probe-failure-threshold": "value", "--h11-max-incomplete-event-size": "value",
    "--h11-max-header-count": "value", "--enable-offline-docs": "bool", "--enable-flash-late-interaction": "bool",
    "--structured-outputs-config": "value",
    "--allow-deprecated-quantization": "bool", "--use-fp64-gumbel": "bool", "--disable-cascade-attn": "bool",
    "--enable-cumem-allocator": "bool", "--renderer-num-workers": "value", "--language-model-only": "bool",
    "--additional-config": "value",
    "--safetensors-load-strategy": "value", "--safetensors-prefetch-num-threads": "value",
    "--safetensors-prefetch-block-size": "value", "--model-loader-extra-config": "value",
    "--use-tqdm-on-load": "bool", "--pt-load-map-location": "value", "--max-parallel-loading-workers": "value",
    "--ignore-patterns": "values",
    "--attention-backend": "value", "--attention-config": "value", "--moe-backend": "value",
    "--linear-backend": "value", "--gdn-prefill-backend": "value", "--mamba-backend": "value",
    "--kernel-config": "value", "--ir-op-priority": "value", "--enable-flashinfer-autotune": "bool",
    "--enable-bf16x3-router-gemm": "bool", "--all2all-backend": "value", "--dcp-comm-backend": "value",
    "--optimization-level": "value", "--cudagraph-capture-sizes": "values", "--max-cudagraph-capture-size": "value",
    "--performance-mode": "value",
    "--prefix-caching-hash-algo": "value", "--prefix-match-unit": "value", "--max-num-scheduled-tokens": "value",
    "--max-num-partial-prefills": "value", "--max-long-partial-prefills": "value",
    "--long-prefill-token-threshold": "value", "--scheduler-reserve-full-isl": "bool", "--watermark": "value",
    "--prefill-schedule-interval": "value", "--stream-interval": "value",
    "--numa-bind": "bool", "--numa-bind-nodes": "values", "--numa-bind-cpus": "values",
    "--enable-ep-weight-filter": "bool", "--enable-dbo": "bool", "--ubatch-size": "value",
    "--dbo-decode-token-threshold": "value", "--dbo-prefill-token-threshold": "value",
    "--disable-nccl-for-dp-synchronization": "bool", "--enable-eplb": "bool", "--eplb-config": "value",
    "--expert-placement-strategy": "value", "--ray-workers-use-nsight": "bool",
    "--dcp-kv-cache-interleave-size": "value", "--cp-kv-cache-interleave-size": "value",
    "--cpu-distributed-timeout-seconds": "value",
    "--media-io-kwargs": "value", "--mm-processor-cache-gb": "value", "--mm-processor-cache-type": "value",
    "--mm-shm-cache-max-object-size-mb": "value", "--mm-encoder-tp-mode": "value",
    "--mm-encoder-attn-backend": "value", "--mm-encoder-attn-dtype": "value", "--mm-encoder-fp8-scale-path": "value",
    "--mm-encoder-fp8-scale-save-path": "value", "--mm-encoder-fp8-scale-save-margin": "value",
    "--interleave-mm-strings": "bool", "--skip-mm-profiling": "bool", "--video-pruning-rate": "value",
    "--mm-tensor-ipc": "value", "--mm-ipc-gpu-memory-gb": "value", "--disable-chunked-mm-input": "bool",
    "--enable-mamba-cache-stochastic-rounding": "bool", "--mamba-cache-philox-rounds": "value",
    "--mamba-cache-dtype": "value", "--mamba-ssm-cache-dtype": "value", "--mamba-block-size": "value",
    "--mamba-cache-mode": "value", "--disable-hybrid-kv-cache-manager": "bool", "--kv-sharing-fast-prefill": "bool",
    "--show-hidden-metrics-for-version": "value", "--collect-detailed-traces": "values", "--kv-cache-metrics": "bool",
    "--kv-cache-metrics-sample": "value", "--cudagraph-metrics": "bool", "--enable-mfu-metrics": "bool",
    "--enable-logging-iteration-details": "bool", "--enable-layerwise-nvtx-tracing": "bool",
    "--jit-monitor-mode": "value", "--jit-monitor-verbose": "bool", "--profiler-config": "value",
    "--aggregate-engine-logging": "switch", "--fail-on-environ-validation": "bool",
}
# vLLM's short names of the flags above
SHORT = {"--compilation-config": "-cc", "--attention-config": "-ac", "--diffusion-config": "-dc",
          "--optimization-level": "-O", "--decode-context-parallel-size": "-dcp",
          "--prefill-context-parallel-size": "-pcp", "--data-parallel-rank": "-dpn",
          "--data-parallel-start-rank": "-dpr", "--data-parallel-size-local": "-dpl",
          "--data-parallel-address": "-dpa", "--data-parallel-rpc-port": "-dpp", "--data-parallel-hybrid-lb": "-dph",
          "--data-parallel-external-lb": "-dpe", "--data-parallel-multi-port-external-lb": "-dpm"}
# vLLM's other names of meshserve's own flags (the same argparse action: the same dest, default and check)
ALIASES = {"--nnodes": "-n", "--node-rank": "-r", "--speculative-config": "-sc",
            "--distributed-timeout-s": "--distributed-timeout-seconds"}
# meshserve's on-switches that vLLM pairs with --no-x (argparse's BooleanOptionalAction)
NEGATABLE = ("--trust-request-chat-template", "--return-tokens-as-token-ids", "--enable-auto-tool-choice",
              "--exclude-tools-when-tool-choice-none", "--enable-prompt-tokens-details",
              "--enable-force-include-usage", "--enable-request-id-headers", "--enable-log-requests",
              "--enable-log-outputs",
              "--disable-uvicorn-access-log", "--allow-credentials", "--disable-fastapi-docs",
              "--trust-remote-code", "--enforce-eager", "--enable-expert-parallel", "--disable-custom-all-reduce")
# vLLM's shorthands of --speculative-config keys
SPEC_SHORTHANDS = {"--spec-method": "method", "--spec-model": "model", "--spec-tokens": "num_speculative_tokens"}
