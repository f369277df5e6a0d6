"""Command-line flags for engine and sampling arguments, shared by generate, serve and bench."""

from __future__ import annotations

import argparse
import copy
import dataclasses

from meshserve.config import CACHE_DTYPES, DTYPES, LOAD_FORMATS, QUANTIZATION_METHODS, EngineArgs
from meshserve.models.embedded import GENERATION_DEFAULTS as EMBEDDED_DEFAULTS
from meshserve.sampling import SamplingParams
from meshserve.vllm_values import dtype_name, human_int


def _bool_flag(parser, name: str, default: bool, help: str) -> None:
    parser.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default, help=help)


def _shows_default(action: argparse.Action) -> bool:
    """An option with a value to show: not None, and not the implied bool of a plain on/off switch
    (`is`, since 0 == False and a default of 0 is worth showing)."""
    if not action.option_strings or action.default is None or action.default is argparse.SUPPRESS:
        return False
    return not isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """--help shows every option's default (argparse's own formatter skips options without help text)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if _shows_default(action) and "%(default)" not in text and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action: argparse.Action) -> str:
        if action.help == "":  # an option with a default but no text: show the default alone
            action = copy.copy(action)
            action.help = self._get_help_string(action)
        return super()._format_action(action)


def apply_defaults_help(parser: argparse.ArgumentParser) -> None:
    """Give parser and every sub-command under it the DefaultsHelpFormatter."""
    parser.formatter_class = DefaultsHelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                apply_defaults_help(sub)
        elif action.help is None and action.option_strings and _shows_default(action):
            action.help = ""  # argparse prints no help line at all for None; the formatter adds the default


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _fmt(defaults: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in defaults.items())


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    d = EngineArgs()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF folder, .gguf file or preset (with --load-format dummy); "
                        "default: the embedded SmolLM2-135M-Instruct")
    g.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    g.add_argument("--dtype", default=d.dtype, choices=DTYPES, type=dtype_name, help="(half, float: vLLM's aliases)")
    g.add_argument("--max-model-len", type=human_int, default=None, help="tokens; 32k = 32000, 32K = 32768")
    g.add_argument("--block-size", type=int, default=d.block_size)
    g.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    g.add_argument("--cpu-kv-cache-bytes", type=int, default=d.cpu_kv_cache_bytes)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default=d.kv_cache_dtype, choices=CACHE_DTYPES,
                   help="KV cache element type (auto: the model dtype; fp8: e4m3 with per-tensor scales, 1.0 "
                        "or the checkpoint's k_scale/v_scale)")
    g.add_argument("--quantization", "-q", default=None, choices=QUANTIZATION_METHODS,
                   help="weight format: fp8 (online from 16-bit weights, or an fp8 checkpoint), awq, gptq, "
                        "compressed-tensors, fbgemm_fp8 (default: the checkpoint's quantization_config)")
    o = parser.add_argument_group("KV offload (evicted prefix blocks spill to CPU memory and disk)")
    o.add_argument("--kv-offloading-size", type=float, default=None, metavar="GiB",
                   help="CPU tier: GiB of (pinned) host memory for evicted KV blocks (default: off)")
    o.add_argument("--kv-offloading-disk-path", default=None, metavar="DIR",
                   help="disk tier: a folder of KV block files, kept across restarts (needs --kv-offloading-size "
                        "and --kv-offloading-disk-size)")
    o.add_argument("--kv-offloading-disk-size", type=float, default=None, metavar="GiB",
                   help="disk tier: the most GiB of block files kept (least recently used deleted; required with "
                        "--kv-offloading-disk-path)")
    o.add_argument("--kv-offloading-backend", default=d.kv_offloading_backend, metavar="native",
                   help="vLLM's flag: native, meshserve's own tiers above (the only one; lmcache is refused)")
    o.add_argument("--kv-offloading-verify", action="store_true",
                   help="debug: check a crc32 of every block restored from a lower tier")
    o.add_argument("--preemption-mode", default=d.preemption_mode, choices=("recompute", "swap", "auto"),
                   help="a preempted sequence's KV: recompute it, swap it to the CPU tier and back, or auto "
                        "(whichever is predicted cheaper)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=human_int, default=None)
    _bool_flag(g, "enable-chunked-prefill", d.enable_chunked_prefill, "mix prefill chunks with decodes")
    _bool_flag(g, "enable-prefix-caching", d.enable_prefix_caching, "reuse KV blocks of shared prefixes")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--load-format", default=d.load_format, choices=LOAD_FORMATS)
    g.add_argument("--generation-config", default=d.generation_config, metavar="{auto,vllm,FOLDER}",
                   help="defaults for the sampling fields a request (or a generate flag) leaves unset: "
                        "auto = the model's generation_config.json (temperature, top_p, top_k, min_p, "
                        "repetition_penalty, max_new_tokens), as vLLM; for the embedded model, which has "
                        f"none, {_fmt(EMBEDDED_DEFAULTS)}; vllm = ignore it (temperature 1.0, top_p 1.0, "
                        "...); FOLDER = the generation_config.json there")
    g.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    g.add_argument("--max-cudagraph-tokens", type=int, default=d.max_cudagraph_tokens, metavar="N",
                   help="largest mixed prefill + decode step replayed from a CUDA graph, in tokens (capped at "
                        "--max-num-batched-tokens); 0: mixed steps run eagerly")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=d.async_scheduling,
                   help="schedule step n+1 while the GPU runs step n (the default; vLLM's flag); --no-async-"
                        "scheduling: each step only after the previous one finished (no CPU/GPU overlap)")
    s = parser.add_argument_group("scheduling and service levels")
    s.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"],
                   help="priority: the queue by each request's priority (lower first), then arrival")
    s.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="time-to-first-token target: admit, schedule and shed to meet it (default: off)")
    s.add_argument("--slo-tpot-ms", type=float, default=None,
                   help="time-per-output-token target: the batch is capped so steps stay under it (default: off)")
    _bool_flag(s, "slo-shed-late", d.slo_shed_late,
               "drop a queued request (429) once it can no longer meet its time-to-first-token target")
    s.add_argument("--slo-prefill-chunk", type=int, default=d.slo_prefill_chunk, metavar="N",
                   help="with --slo-tpot-ms and requests decoding: most prompt tokens one step carries beside the "
                        "decodes (0: only the TPOT target caps them)")
    s.add_argument("--step-trace", default=None, metavar="FILE",
                   help="write a JSON line per engine step (shape, predicted and measured device time)")
    p = parser.add_argument_group("parallelism")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--pp-layer-partition", type=_int_list, default=None,
                   help="layers per pipeline stage, e.g. 40,40 (default: even split)")
    p.add_argument("--pipeline-depth", type=int, default=0,
                   help="steps in flight with pipeline stages (default 0: one per stage; stages + 1 hides the "
                        "host's round trip for each step's tokens)")
    p.add_argument("--pp-token-handoff", action="store_true",
                   help="experimental, -pp > 1 with -tp 1: the last stage sends each step's sampled ids straight "
                        "to the first stage, so a sequence's next step launches before its token is back")
    p.add_argument("--distributed-executor-backend", default=d.distributed_executor_backend,
                   choices=("mp", "ray"), help="mp: local processes (default); ray: an existing Ray cluster")
    p.add_argument("--nnodes", type=int, default=d.nnodes)
    p.add_argument("--node-rank", type=int, default=d.node_rank)
    p.add_argument("--master-addr", default=d.master_addr)
    p.add_argument("--master-port", type=int, default=None)
    p.add_argument("--distributed-timeout-s", type=float, default=d.distributed_timeout_s,
                   help="a rank silent this long stops the whole group")
    p.add_argument("--enable-expert-parallel", "-ep", action="store_true",
                   help="MoE models: spread the experts over the tensor-parallel ranks, tokens exchanged by "
                        "all-to-all (default: every rank holds a 1/TP slice of every expert)")
    p.add_argument("--disable-custom-all-reduce", action="store_true",
                   help="NCCL for every tensor-parallel all-reduce (default: a one-shot symmetric-memory "
                        "kernel for small messages on GPUs, NCCL above)")
    g.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    g.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys: {"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_max": 4}, {"method": "draft_model", "model": DIR, '
                        '"num_speculative_tokens": 4} or {"method": "eagle3", "model": EAGLE3_HEAD_DIR, '
                        '"num_speculative_tokens": 3}')
    g.add_argument("--kv-transfer-config", default=None, metavar="JSON",
                   help='prefill/decode disaggregation, vLLM\'s keys: {"kv_connector": "torch" | "nixl" | "ipc", '
                        '"kv_role": "kv_producer" | "kv_consumer" | "kv_both", "kv_rank": 0, "kv_parallel_size": 2, '
                        '"kv_ip": "127.0.0.1", "kv_port": 14579, "kv_connector_extra_config": {...}}; extra keys: '
                        'transfer_timeout_s (30), hold_timeout_s (120), init_timeout_s (300) in seconds, '
                        'layerwise (false), backend (torch: nccl | gloo), side_channel_host')


def engine_args_from(ns: argparse.Namespace) -> EngineArgs:
    names = EngineArgs.field_names()
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


# the flag's default when neither it nor the model's generation config gives one
_MAX_TOKENS = 256
_MODEL_DEFAULT = "default: the model's, else "


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group(
        "sampling", "A flag left unset takes the model's default (--generation-config), as a server request "
                    "does.")
    g.add_argument("--n", type=int, default=1)
    # None = unset: the model's generation_config.json (or SamplingParams' default) decides after loading
    g.add_argument("--max-tokens", type=int, default=None, help=f"({_MODEL_DEFAULT}{_MAX_TOKENS})")
    g.add_argument("--min-tokens", type=int, default=0)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (" + _MODEL_DEFAULT + "1.0)")
    g.add_argument("--top-p", type=float, default=None, help=f"({_MODEL_DEFAULT}1.0)")
    g.add_argument("--top-k", type=int, default=None, help="0 = off (" + _MODEL_DEFAULT + "0)")
    g.add_argument("--min-p", type=float, default=None, help=f"({_MODEL_DEFAULT}0.0)")
    g.add_argument("--repetition-penalty", type=float, default=None, help=f"({_MODEL_DEFAULT}1.0)")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--stop-token-ids", type=_int_list, default=None, metavar="ID[,ID...]",
                   help="comma-separated token ids that end a completion")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--logprobs", type=int, default=None, metavar="K",
                   help="print each generated token with its logprob and the K likeliest alternatives")


def sampling_params_from(ns: argparse.Namespace, model_defaults: dict | None = None) -> SamplingParams:
    """The flags given win; unset ones take `model_defaults` (the model's generation_config.json), then
    SamplingParams' own (max_tokens: 256). Called once before loading, to reject bad flags early."""
    fields = {f.name for f in dataclasses.fields(SamplingParams) if not f.name.startswith("_")}
    kwargs = {k: v for k, v in vars(ns).items() if k in fields and k != "seed"}
    kwargs["seed"] = ns.sampling_seed
    return SamplingParams.from_defaults({"max_tokens": _MAX_TOKENS, **(model_defaults or {})}, **kwargs)
