"""`meshserve simulate`: a serving fleet under an arrival trace, in simulated time; prints JSON."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from meshserve.cli_paths import check_output_file
from meshserve.errors import InvalidArgumentError
from meshserve.simulator.frontend import FRONTEND_BEFORE_GATE, FRONTEND_H200, FrontEndCosts


def register(subparsers) -> None:
    """Add the `simulate` subcommand to meshserve's argument parser."""
    from meshserve.planner.memory import KV_DTYPE_BYTES, WEIGHT_DTYPE_BYTES
    from meshserve.simulator.config import REPLICA_MODELS, ROUTER_POLICIES, SimConfig
    from meshserve.simulator.fast_fleet import FAST_MODEL_COVERS

    from meshserve.simulator.config_file import ConfigFileAction

    d = SimConfig()
    p = subparsers.add_parser(
        "simulate", help="discrete-event simulation of a serving fleet: latency, goodput, GPU-hours, $/1M tokens",
        description="Drive the engine's real scheduler on a simulated clock, with step times from a step-time "
                    "model calibrated on our own H200 step trace, behind the router's policy. Prints JSON.")
    p.add_argument("--config", action=ConfigFileAction, default=None, metavar="FILE",
                   help="a TOML (or .json) file of this command's flags, keys without the dashes (num-gpus = 8); "
                        "applied where it stands on the command line, so flags after it win")
    g = p.add_argument_group("fleet")
    g.add_argument("--model", default=d.model, help="planner preset or config.json")
    g.add_argument("--gpu", default=d.gpu, help="GPU from the planner's catalog")
    g.add_argument("--num-gpus", type=int, default=d.num_gpus)
    g.add_argument("--tp", type=int, default=d.tp,
                   help="tensor-parallel GPUs per pipeline stage (replicas = GPUs / (TP x PP))")
    g.add_argument("--pp", type=int, default=d.pp,
                   help="pipeline stages per replica (meshserve/simulator/pipeline.py)")
    g.add_argument("--pipeline-depth", type=int, default=d.pipeline_depth,
                   help="steps a PP replica keeps in flight (the engine's --pipeline-depth; 0: one per stage)")
    g.add_argument("--pp-host-step-ms", type=float, default=None,
                   help="host time per pipelined step on the first stage (default: the calibration's "
                        "pipeline.host_step_ms, fitted on 2 x H200)")
    g.add_argument("--pp-round-trip-ms", type=float, default=None,
                   help="the rest of a pipelined step's round trip through the host, which delays it without "
                        "keeping the host busy (default: the calibration's pipeline.round_trip_ms)")
    g.add_argument("--pp-token-handoff", action="store_true",
                   help="the engine's --pp-token-handoff (TP 1): sampled ids go from the last stage to the first "
                        "on the device, off the host's round trip")
    g.add_argument("--pp-layer-partition", type=_layer_partition, default=None,
                   help="layers per pipeline stage, comma-separated (the engine's --pp-layer-partition)")
    g.add_argument("--enable-expert-parallel", action="store_true",
                   help="MoE experts spread whole over each replica's --tp ranks (the engine's flag; no effect on a "
                        "dense model)")
    g.add_argument("--tp-fused-norm", choices=("off", "pull", "push"), default="off",
                   help="MESHSERVE_TP_FUSED_NORM: TP all-reduces fused with the residual add and RMSNorm")
    g.add_argument("--router", default=d.router, choices=ROUTER_POLICIES)
    g.add_argument("--max-outstanding", type=int, default=None, metavar="N",
                   help="the router's --max-outstanding: a request that finds N in flight (on replicas or between "
                        "them) gets 503 at once, counted as rejected (meshserve/simulator/router_admission.py; one "
                        "router process; default: no limit)")
    g.add_argument("--replica-model", default="fast", choices=REPLICA_MODELS,
                   help="fast (default): the scheduler's policy on aggregate state with decode steps in closed form "
                        "(the scheduler's reports on the tested configurations, ~5x faster on 100 replicas, ~13x compiled with `python -m meshserve.simulator.native build`); it covers "
                        f"{FAST_MODEL_COVERS}; anything else runs on the scheduler, with the reason in the report's "
                        "replica_model_fallback. scheduler: the engine's own Scheduler per replica (the reference)")
    g.add_argument("--calibration", default=d.calibration,
                   help="step-time weights: a section of meshserve/simulator/calibration.toml (default: the "
                        "GPU's own fit of the model where it has one (H100-SXM: h100_*_curve), else the model's own "
                        "H200 fit (h200_qwen3_0_6b_balanced for qwen3-0.6b), else h200_1206, the 8B with mixed-step "
                        "CUDA graphs (h200_mixed_graphs) and its one-token step at the 2026-12-06 build's W1; "
                        "h200_before_mixed_graphs: the engine before them)")
    g.add_argument("--step-noise", choices=("on", "off"), default="off",
                   help="on: each step's time strays from the model's as the calibration's step trace did, plus the "
                        "host gap between steps (calibration.toml's step_noise tables, drawn per replica from "
                        "--seed); off (default): every step lasts its prediction")
    g.add_argument("--hardware-file", default=None, help="TOML overriding the GPU catalog (prices, rates)")
    g = p.add_argument_group("prefill/decode disaggregation (`meshserve router --prefill ... --decode ...`)")
    g.add_argument("--disaggregation", type=_p_to_d, default=None, metavar="P:D",
                   help="P of the layout's replicas run prompts (and each first token), D decode; each prompt's KV "
                        "crosses to a decode replica (meshserve/simulator/disaggregated.py; off by default: "
                        "every replica colocated)")
    g.add_argument("--kv-link-gb-s", type=float, default=None,
                   help="KV transfer bandwidth per prefill replica, GB/s (default: the catalog's GPU link, e.g. "
                        "NVLink within a node, times TP)")
    g.add_argument("--kv-transfer-latency-us", type=float, default=None,
                   help="fixed latency per KV transfer (default: the catalog's link latency)")
    g = p.add_argument_group("replica failures")
    g.add_argument("--fail-replica", type=_failure, action="append", default=[], metavar="R@T+D",
                   help="replica R (0-based) dies at T seconds and its restart answers /ready D seconds later; the "
                        "router ejects it at once, its streams with a token out end with an error, its other "
                        "requests go to other replicas, and it is re-admitted after the router's health probes "
                        "(meshserve/simulator/failures.py); repeatable, e.g. --fail-replica 3@60+90")
    g.add_argument("--hang-replica", type=_hang, action="append", default=[], metavar="R@T+D",
                   help="replica R stops answering at T seconds for D seconds, then goes on where it was (a "
                        "SIGSTOP, then a SIGCONT): its requests wait, the router sends it work until its health "
                        "probes eject it and re-admits it once it answers; a hang past the router's read timeout "
                        "(--read-timeout) ends its requests as a kill does (meshserve/simulator/failures.py); "
                        "repeatable, "
                        "e.g. --hang-replica 0@30+10")
    # the router's health checks, as `meshserve router` takes them (meshserve/router/config.py)
    g.add_argument("--health-interval", type=float, default=d.health_interval_s, metavar="S",
                   help="seconds between the router's health probes of each replica")
    g.add_argument("--health-timeout", type=float, default=d.health_timeout_s, metavar="S",
                   help="a probe without an answer in this long fails")
    g.add_argument("--fail-threshold", type=int, default=d.fail_threshold, metavar="N",
                   help="failed probes in a row that eject a replica")
    g.add_argument("--recover-threshold", type=int, default=d.recover_threshold, metavar="N",
                   help="good probes in a row that re-admit an ejected replica")
    g.add_argument("--read-timeout", type=float, default=d.read_timeout_s, metavar="S",
                   help="the longest silence from a replica before the router gives a request up (a hung "
                        "replica's requests: cut if streaming with a token out, else retried)")
    g = p.add_argument_group("engine (per replica, as `meshserve serve`)")
    g.add_argument("--dtype", choices=sorted(WEIGHT_DTYPE_BYTES), default=None,
                   help="weight dtype, as `meshserve plan --dtype` (the engine's --quantization fp8 / awq / gptq: "
                        "fp8, int4; default: the checkpoint's)")
    g.add_argument("--kv-dtype", choices=sorted(KV_DTYPE_BYTES), default=d.kv_dtype,
                   help="KV cache dtype, as `meshserve plan --kv-dtype` (the engine's --kv-cache-dtype)")
    g.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    g.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    g.add_argument("--max-model-len", type=int, default=d.max_model_len)
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks per replica (default: the planner's)")
    g.add_argument("--slo-ttft-ms", type=float, default=None,
                   help="the server's TTFT target: SLO-aware admission and shedding (off by default)")
    g.add_argument("--slo-tpot-ms", type=float, default=None, help="the server's TPOT target (batch budget)")
    g.add_argument("--slo-prefill-chunk", type=int, default=d.slo_prefill_chunk,
                   help="with --slo-tpot-ms: most prompt tokens per step beside decodes (0: the target alone)")
    g.add_argument("--max-queue-len", type=int, default=d.max_queue_len)
    g.add_argument("--frontend-latency-ms", type=float, default=0.0,
                   help="fixed latency (network, HTTP) before a request reaches its replica (counted in TTFT)")
    g.add_argument("--frontend-request-ms", type=float, default=None,
                   help="the API process's CPU per request (parse, tokenize, admit or 429): a queue in front of "
                        f"each replica's core (default {FRONTEND_H200.per_request_s * 1e3:g}: measured on one H200's "
                        "host under W3, pinned by the light-load TTFT; 0 with --frontend-token-us 0: no front-end "
                        "queue)")
    g.add_argument("--frontend-token-us", type=float, default=None,
                   help="the API process's CPU per streamed token (detokenize, one SSE event; default "
                        f"{FRONTEND_H200.per_token_s * 1e6:g})")
    g.add_argument("--frontend-refusal-ms", type=float, default=None,
                   help="the API process's CPU per 429 from its gate (with --slo-ttft-ms: a request its process's "
                        "delays plus the core's queue wait cannot serve in time is refused before parsing, as "
                        f"`meshserve serve` does; default {FRONTEND_H200.per_refusal_s * 1e3:g}, measured)")
    g.add_argument("--no-frontend-gate", action="store_true",
                   help="model the server before the API process's gate (every 429 after a full intake), with "
                        f"that build's costs unless given ({FRONTEND_BEFORE_GATE.per_request_s * 1e3:g} ms, "
                        f"{FRONTEND_BEFORE_GATE.per_token_s * 1e6:g} us)")
    g.add_argument("--frontend-stalls", choices=("on", "off"), default="off",
                   help="on: with the gate, each API process stalls in full garbage collections as servers before "
                        "054ccb3 did (or `serve --no-gc-freeze` does): one stall every ~130 requests it takes in, "
                        "0.06-0.27 s, measured on W3 (meshserve/simulator/frontend_stalls.py); off (default): the "
                        "server since, which freezes its start-up heap")
    g.add_argument("--api-server-count", type=int, default=1,
                   help="API processes per replica, as `meshserve serve --api-server-count` (each one such queue)")
    g = p.add_argument_group("router process (`meshserve router`, `serve --data-parallel-backend router`)")
    g.add_argument("--router-node", choices=("off", "on"), default="off",
                   help="on: the router's own process as one CPU queue in front of the replicas (every request, "
                        "retried 429 and streamed event crosses it), costs from --router-calibration; off "
                        "(default): the router is a policy only, as `serve --data-parallel-size N` with its "
                        "internal back end (no router hop)")
    g.add_argument("--router-calibration", default="default",
                   help="a section of meshserve/simulator/router_calibration.toml (default: h200_host_1206, "
                        "the router that ships, measured with `meshserve bench frontend --through-router` on an "
                        "H200 machine's CPU; h200_host: the same two days earlier; cpu_light / cpu_loaded: an "
                        "older router on a 2-core CPU box)")
    g.add_argument("--router-request-ms", type=float, default=None, help="override: router CPU per request")
    g.add_argument("--router-event-us", type=float, default=None, help="override: router CPU per streamed event")
    g.add_argument("--router-refusal-ms", type=float, default=None,
                   help="override: router CPU per 429 from a replica (before a retry or the client's 429)")
    g = p.add_argument_group("traffic")
    g.add_argument("--qps", type=float, default=8.0, help="mean arrival rate (poisson, bursty)")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--arrivals", choices=["poisson", "bursty"], default="poisson")
    g.add_argument("--burst-factor", type=float, default=4.0, help="bursty: rate in a burst / rate outside")
    g.add_argument("--burst-period", type=float, default=30.0, help="bursty: seconds from one burst to the next")
    g.add_argument("--burst-duty", type=float, default=0.2, help="bursty: fraction of each period in the burst")
    g.add_argument("--trace", default=None, metavar="JSONL",
                   help="a file of requests (arrival_s, prompt_len, output_len per line) instead of --qps")
    g.add_argument("--input-len", type=int, default=512, help="prompt tokens (default: W3's 512)")
    g.add_argument("--output-len", type=int, default=128, help="output tokens (default: W3's 128)")
    g.add_argument("--prefix-groups", type=int, default=0, help="requests share one of N prefixes (0: none)")
    g.add_argument("--prefix-len", type=int, default=256, help="tokens of each shared prefix")
    g = p.add_argument_group("autoscaling (deploy/k8s/autoscaling-keda.yaml's rule; --num-gpus / --tp replicas at start)")
    g.add_argument("--autoscale", action="store_true", help="scale replicas on the router's queue depth")
    g.add_argument("--target-queue-per-replica", type=int, default=16)
    g.add_argument("--min-replicas", type=int, default=1)
    g.add_argument("--max-replicas", type=int, default=8)
    g.add_argument("--polling-s", type=float, default=15.0)
    g.add_argument("--cooldown-s", type=float, default=300.0, help="no scale-in sooner after a scale-up")
    g.add_argument("--startup-s", type=float, default=60.0, help="a new replica's time to ready (assumed)")
    g = p.add_argument_group("layout search")
    g.add_argument("--search", action="store_true",
                   help="simulate every TP x DP layout that fits and rank them by goodput per dollar")
    g.add_argument("--search-gpus", default=None, metavar="N,N,...",
                   help="GPU counts to search (default: --num-gpus)")
    g = p.add_argument_group("report")
    g.add_argument("--ttft-slo", type=float, default=1.0, help="goodput's TTFT target, seconds (W3: 1)")
    g.add_argument("--tpot-slo", type=float, default=0.05, help="goodput's TPOT target, seconds (W3: 0.05)")
    g.add_argument("--output-json", default=None, help="also write the JSON here")
    g.add_argument("--plot", default=None, metavar="FILE",
                   help="requests waiting/running (and replicas) over time: PNG with matplotlib, else SVG")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_simulate)


def _layer_partition(value: str) -> tuple[int, ...]:
    """--pp-layer-partition 40,40."""
    try:
        return tuple(int(x) for x in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer counts, e.g. 40,40, got {value!r}") from None


def _failure(value: str) -> tuple[int, float, float]:
    """--fail-replica R@T+D, e.g. 3@60+90."""
    try:
        replica, rest = value.split("@")
        at_s, down_s = rest.split("+")
        return int(replica), float(at_s), float(down_s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected R@T+D (replica, seconds at which it dies, seconds until its "
                                         f"restart is ready, e.g. 3@60+90), got {value!r}") from None


def _hang(value: str) -> tuple[int, float, float]:
    """--hang-replica R@T+D, e.g. 0@30+10."""
    try:
        return _failure(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected R@T+D (replica, seconds at which it stops answering, seconds "
                                         f"until it goes on, e.g. 0@30+10), got {value!r}") from None


def _p_to_d(value: str) -> tuple[int, int]:
    """--disaggregation P:D, e.g. 1:1."""
    try:
        p, d = (int(x) for x in value.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P:D (prefill:decode replicas, e.g. 1:1), got {value!r}") from None
    return p, d


# arrivals past which a generated trace is refused: minutes of simulation per million requests on one core
MAX_GENERATED_REQUESTS = 100_000_000


def check_traffic(ns: argparse.Namespace) -> None:
    """The generated trace's flags (a NaN rate used to fail as a numpy traceback, an input length of 0 ran)."""
    if ns.trace is None:
        for flag, value in (("--qps", ns.qps), ("--duration", ns.duration)):
            if not 0 < value < math.inf:
                raise InvalidArgumentError(f"{flag} must be > 0 and finite, got {value}", param=flag[2:])
        if ns.qps * ns.duration > MAX_GENERATED_REQUESTS:
            raise InvalidArgumentError(f"--qps {ns.qps:g} x --duration {ns.duration:g} is {ns.qps * ns.duration:.3g} "
                                       f"requests; at most {MAX_GENERATED_REQUESTS:,}", param="duration")
        for flag, value in (("--input-len", ns.input_len), ("--output-len", ns.output_len)):
            if value < 1:
                raise InvalidArgumentError(f"{flag} must be >= 1, got {value}", param=flag[2:])
        # every generated request is the same length: past --max-model-len each one was refused (the engine's
        # prompt + max_tokens check) and the run reported 0 completed with exit 0
        prompt = max(ns.input_len, ns.prefix_len + 1) if ns.prefix_groups > 0 else ns.input_len
        if prompt + ns.output_len > ns.max_model_len:
            said = f"--input-len {prompt}" if prompt == ns.input_len else f"a prompt of --prefix-len {ns.prefix_len} + 1"
            raise InvalidArgumentError(f"{said} + --output-len {ns.output_len} exceeds --max-model-len "
                                       f"{ns.max_model_len}: every request would be refused", param="max_model_len")
        if ns.arrivals == "bursty" and not (ns.burst_period > 0 and math.isfinite(ns.burst_period)):
            raise InvalidArgumentError(f"--burst-period must be > 0 and finite, got {ns.burst_period}",
                                       param="burst_period")
        if ns.arrivals == "bursty" and not 0 < ns.burst_duty < 1:  # named by flag (trace.py says "duty")
            raise InvalidArgumentError(f"--burst-duty must be in (0, 1), got {ns.burst_duty}", param="burst_duty")
        if ns.arrivals == "bursty" and not 1 <= ns.burst_factor < math.inf:  # NaN and inf passed trace.py's check
            raise InvalidArgumentError(f"--burst-factor must be >= 1 and finite, got {ns.burst_factor}",
                                       param="burst_factor")
    if ns.prefix_groups < 0 or (ns.prefix_groups > 0 and ns.prefix_len < 1):
        raise InvalidArgumentError("--prefix-groups must be >= 0, and --prefix-len >= 1 with prefix groups",
                                   param="prefix_groups")


def build_trace(ns: argparse.Namespace):
    from meshserve.simulator import trace as tr

    check_traffic(ns)
    if ns.trace:
        reqs = tr.file_trace(ns.trace)
        too_long = reqs.prompt_len + reqs.output_len > ns.max_model_len
        if too_long.all():  # it ran, refused every request and reported 0 completed with exit 0
            shortest = int((reqs.prompt_len + reqs.output_len).min())
            raise InvalidArgumentError(f"--trace {ns.trace}: every request's prompt + output (at least {shortest} "
                                       f"tokens) exceeds --max-model-len {ns.max_model_len}: every request would "
                                       "be refused", param="max_model_len")
    elif ns.arrivals == "bursty":
        reqs = tr.bursty_trace(ns.qps, ns.duration, ns.seed, ns.burst_factor, ns.burst_period, ns.burst_duty,
                               input_len=ns.input_len, output_len=ns.output_len)
    else:
        reqs = tr.poisson_trace(ns.qps, ns.duration, ns.seed, ns.input_len, ns.output_len)
    if ns.prefix_groups > 0:
        reqs = tr.shared_prefix_trace(reqs, ns.prefix_groups, ns.prefix_len, ns.seed)
    if not reqs:
        raise InvalidArgumentError("the trace has no requests (raise --qps or --duration)", param="qps")
    return reqs


def _strict(value):
    """JSON without NaN/Infinity (null instead)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def _router_costs_said(ns: argparse.Namespace) -> str:
    """Where the router node's costs come from, for the assumptions: the calibration's section and source, and
    the flags that override it."""
    from meshserve.simulator.router_node import router_costs_source

    flags = [f for f, v in (("--router-request-ms", ns.router_request_ms), ("--router-event-us", ns.router_event_us),
                            ("--router-refusal-ms", ns.router_refusal_ms)) if v is not None]
    said = f"router_calibration.toml {router_costs_source(ns.router_calibration)}"
    return said + (f"; overridden by {', '.join(flags)}" if flags else "")


def router_costs_from_args(ns: argparse.Namespace):
    """The router node's costs: off, or the calibration's with any --router-* override."""
    from meshserve.simulator.router_node import ROUTER_OFF, load_router_costs

    if ns.router_node == "off":
        return ROUTER_OFF
    c = load_router_costs(ns.router_calibration)
    return type(c)(c.per_request_s if ns.router_request_ms is None else ns.router_request_ms / 1e3,
                   c.per_event_s if ns.router_event_us is None else ns.router_event_us / 1e6,
                   c.per_refusal_s if ns.router_refusal_ms is None else ns.router_refusal_ms / 1e3)


def frontend_costs_from_args(ns: argparse.Namespace) -> FrontEndCosts:
    """The API process's costs: those of the build modelled (FRONTEND_BEFORE_GATE with --no-frontend-gate) with
    any --frontend-* override."""
    c = FRONTEND_BEFORE_GATE if ns.no_frontend_gate else FRONTEND_H200
    return FrontEndCosts(c.per_request_s if ns.frontend_request_ms is None else ns.frontend_request_ms / 1e3,
                         c.per_token_s if ns.frontend_token_us is None else ns.frontend_token_us / 1e6,
                         c.per_refusal_s if ns.frontend_refusal_ms is None else ns.frontend_refusal_ms / 1e3)


def config_from_args(ns: argparse.Namespace):
    """The SimConfig of a parsed `meshserve simulate` command line (validated)."""
    from meshserve.simulator.config import SimConfig

    router = router_costs_from_args(ns)
    frontend = frontend_costs_from_args(ns)
    config = SimConfig(model=ns.model, gpu=ns.gpu, num_gpus=ns.num_gpus, tp=ns.tp, pp=ns.pp,
                       pipeline_depth=ns.pipeline_depth, weight_dtype=ns.dtype, kv_dtype=ns.kv_dtype,
                       enable_expert_parallel=ns.enable_expert_parallel,
                       pp_host_step_s=None if ns.pp_host_step_ms is None else ns.pp_host_step_ms / 1e3,
                       pp_round_trip_s=None if ns.pp_round_trip_ms is None else ns.pp_round_trip_ms / 1e3,
                       pp_token_handoff=ns.pp_token_handoff, pp_layer_partition=ns.pp_layer_partition,
                       tp_fused_norm="" if ns.tp_fused_norm == "off" else ns.tp_fused_norm,
                       router=ns.router, max_outstanding=ns.max_outstanding,
                       slo_ttft_s=None if ns.slo_ttft_ms is None else ns.slo_ttft_ms / 1e3,
                       slo_tpot_s=None if ns.slo_tpot_ms is None else ns.slo_tpot_ms / 1e3,
                       slo_prefill_chunk=ns.slo_prefill_chunk, goodput_ttft_s=ns.ttft_slo, goodput_tpot_s=ns.tpot_slo, max_num_seqs=ns.max_num_seqs,
                       max_num_batched_tokens=ns.max_num_batched_tokens, max_model_len=ns.max_model_len,
                       num_blocks=ns.num_blocks, max_queue_len=ns.max_queue_len, hardware_file=ns.hardware_file,
                       frontend_latency_s=ns.frontend_latency_ms / 1e3,
                       frontend_request_s=frontend.per_request_s, frontend_token_s=frontend.per_token_s,
                       frontend_refusal_s=frontend.per_refusal_s, frontend_gate=not ns.no_frontend_gate,
                       frontend_stalls=ns.frontend_stalls == "on",
                       api_server_count=ns.api_server_count, router_request_s=router.per_request_s,
                       router_event_s=router.per_event_s, router_refusal_s=router.per_refusal_s,
                       replica_model=ns.replica_model,
                       calibration=ns.calibration, step_noise=ns.step_noise == "on", seed=ns.seed,
                       disaggregation=ns.disaggregation, kv_link_gb_s=ns.kv_link_gb_s,
                       replica_failures=tuple(ns.fail_replica), replica_hangs=tuple(ns.hang_replica),
                       health_interval_s=ns.health_interval, health_timeout_s=ns.health_timeout,
                       fail_threshold=ns.fail_threshold, recover_threshold=ns.recover_threshold,
                       read_timeout_s=ns.read_timeout,
                       kv_transfer_latency_s=None if ns.kv_transfer_latency_us is None
                       else ns.kv_transfer_latency_us / 1e6)
    config.validate()
    # a GPU or calibration name the run looks up only once started: checked now, before the progress bar
    from meshserve.simulator.step_cost import calibration_entry

    config.gpu_spec()
    calibration_entry(config.calibration_section)
    return config


def run_simulate(ns: argparse.Namespace) -> int:
    from meshserve.simulator.fleet import simulate

    check_output_file(ns.output_json, "--output-json")  # before the run: its report must not be lost
    check_output_file(ns.plot, "--plot")
    plot_path = _plot_path(ns.plot)
    if plot_path != ns.plot:  # the SVG written in its place is checked too: a folder of that name was a traceback
        check_output_file(plot_path, "--plot")  # after the whole run, its report lost
    config = config_from_args(ns)
    trace = build_trace(ns)
    if ns.search:
        return _run_search(ns, config, trace)
    autoscale = None
    if ns.autoscale:
        from meshserve.simulator.autoscale import AutoscaleRule

        if (not 1 <= ns.min_replicas <= ns.max_replicas or ns.target_queue_per_replica < 1
                or not 0 < ns.polling_s < math.inf or not 0 <= ns.cooldown_s < math.inf
                or not 0 <= ns.startup_s < math.inf):
            raise InvalidArgumentError("autoscaling: need 1 <= --min-replicas <= --max-replicas, "
                                       "--target-queue-per-replica >= 1, --polling-s > 0, --cooldown-s and "
                                       "--startup-s >= 0 (all finite)", param="autoscale")
        autoscale = AutoscaleRule(ns.target_queue_per_replica, ns.min_replicas, ns.max_replicas, ns.polling_s,
                                  ns.cooldown_s, ns.startup_s)
    bar, progress = None, None  # after every check: an error line used to follow a started progress bar
    if not ns.no_progress:
        from tqdm.auto import tqdm

        span = trace[-1].arrival_s
        bar = tqdm(total=round(span, 1), desc="simulated s", unit="s", dynamic_ncols=True, file=sys.stderr)

        def progress(t: float) -> None:
            bar.update(round(min(t, span), 1) - bar.n)

    try:
        report = simulate(config, trace, progress=progress, autoscale=autoscale)
    finally:
        if bar is not None:
            bar.close()
    if report.get("replica_model_fallback"):
        print(f"note: the fast replica model does not cover {report['replica_model_fallback']}; simulated with the "
              "scheduler (--replica-model scheduler)", file=sys.stderr)
    report["command"] = "meshserve simulate " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["simulate"] else None
    report["assumptions"] = [
        (f"GPU prices are the catalog's assumed on-demand $/GPU-hour ({report['cost']['usd_per_gpu_hour']:.2f} "
        f"for {report['gpu']}), not quotes"),
        (f"step times: the engine's step-time model with weights fitted to our measurements (calibration.toml's "
         f"{_fit_of(report.get('calibration', ns.calibration))}), scaled to other GPUs and models by their "
         "data-sheet bandwidth and FLOP/s (a fit of one GPU kind priced another 12-13% slow: PLANNER.md)"
        + ("; step-time noise (measured / predicted) and host gaps between steps as that trace's engine showed "
           "them, the same on every GPU" if ns.step_noise == "on" else "; no step-time noise")),
        (f"each of a replica's {ns.api_server_count} API process(es) is one CPU queue: "
         f"{config.frontend_request_s * 1e3:g} ms per request (a 429 after parsing included) and "
         f"{config.frontend_token_s * 1e6:g} us per streamed token ("
         + ("the server before the gate: fitted to its API process saturating at W3 QPS 96 on one H200's host, "
            "BENCHMARKS.md issue 18; the split between the two is an estimate" if ns.no_frontend_gate else
            "the API processes' CPU measured under W3 on one H200's host, 2026-12-02: 11.9 ms per admitted request "
            "with its 128 tokens; the split between the two pinned by the light-load TTFT, not measured")
         + "), plus a fixed --frontend-latency-ms"
         + ("" if ns.no_frontend_gate or not ns.slo_ttft_ms else
            "; with --slo-ttft-ms each process's gate answers 429 before parsing "
            f"({config.frontend_refusal_s * 1e3:g} ms each: the measured mean over every 429) when its input "
            "delay and loop lag plus the core's queue wait break the target, as `meshserve serve` does")
         + "; the network is not modelled; every request runs to its output length"),
        *([] if config.max_outstanding is None else [
            f"the router refuses a request that finds --max-outstanding {config.max_outstanding} in flight (on the "
            "replicas or queued in the router) with a 503 at once, counted as rejected; one router process (each "
            "worker of `meshserve router --workers N` has its own limit)"]),
        *([] if not config.replica_failures else [
            f"replica failures {', '.join(f'{r}@{t:g}+{d:g}' for r, t, d in config.replica_failures)}: ejected at "
            "once (connections reset), streams with a token out cut, the rest retried on other replicas; the "
            f"restart comes back empty and is re-admitted after the router's health probes "
            f"({config.recover_threshold} good, every {config.health_interval_s:g} s); no slow death"]),
        *([] if not config.replica_hangs else [
            f"replica hangs {', '.join(f'{r}@{t:g}+{d:g}' for r, t, d in config.replica_hangs)}: the replica keeps "
            "its requests and goes on where it was; the router keeps sending it work (least outstanding) until "
            f"its health probes eject it ({config.fail_threshold} probes in a row unanswered within "
            f"{config.health_timeout_s:g} s, a round every {config.health_interval_s:g} s after the last one's "
            "answers or timeouts) and re-admits it after "
            f"{config.recover_threshold} good ones; past the router's {config.read_timeout_s:g} s read timeout its "
            "requests end as at a kill (streams with a token out cut, the rest retried elsewhere) and it goes on "
            "empty"]),
        *_dtype_assumptions(report["weight_dtype"], report["kv_dtype"]),
        *_architecture_assumptions(config),
        *([] if config.disaggregation is None else [
            f"disaggregation {config.disaggregation[0]}:{config.disaggregation[1]}: each prompt's KV ({report['kv_dtype']}, the "
            f"planner's bytes per token) moves after its prefill over {report['disaggregation']['kv_link_gb_s']:g} "
            "GB/s per prefill replica, one transfer at a time, plus a fixed latency (no layer-wise overlap); a "
            "decode replica without KV room queues the hand-off (the server answers 503 and the router retries "
            "colocated: not modelled), the decode leg's own intake in the API process is not charged"]),
        ("the router is a policy only (no process, no CPU: `serve --data-parallel-size N`'s internal back end)"
         if ns.router_node == "off" else
         f"the router process is one CPU queue: {config.router_request_s * 1e3:g} ms per request, "
         f"{config.router_refusal_s * 1e3:g} ms per 429 from a replica, {config.router_event_s * 1e6:g} us per "
         f"streamed event ({_router_costs_said(ns)})"),
    ]
    if ns.plot:
        from meshserve.simulator.plots import plot_timeline

        report["plot"] = plot_timeline(report, ns.plot)
        if report["plot"] != ns.plot:  # it wrote another file than the one asked for without a word
            print(f"note: matplotlib is not installed: --plot wrote {report['plot']} (SVG) instead of {ns.plot}",
                  file=sys.stderr)
    _emit(report, ns.output_json)
    return 0


def _plot_path(path: str | None) -> str | None:
    """The file --plot will write: bench.plots.write_line_plots writes NAME.svg when matplotlib is missing."""
    if path is None or path.endswith(".svg"):
        return path
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return os.path.splitext(path)[0] + ".svg"
    return path


def _dtype_assumptions(weight_dtype: str, kv_dtype: str) -> list[str]:
    """The report's line on how narrower weights and caches are priced (step_cost.DtypeTime)."""
    from meshserve.simulator.step_cost import load_dtype_time

    table, lines = load_dtype_time(), []
    for what, dtype, ratios, measured in (
            ("weights", weight_dtype, table.weights, "batch-1 decode of Llama-3.1-8B on one H200"
             + (f"; the FLOP term at {table.flops[weight_dtype]:g}x bf16's data-sheet rate, fitted to one W2 run "
                "of Llama-3.1-8B" if weight_dtype in table.flops else "; the FLOP term at the data sheet's rate")),
            ("KV cache", kv_dtype, table.kv, "the decode attention kernel at batch 64-256 on one H200; slower "
             "than bf16 at batch 16, not modelled")):
        if dtype in ("bf16", "fp16"):
            continue
        if dtype in ratios:
            lines.append(f"{dtype} {what}: the step's {what} term at {ratios[dtype]:.3f} of bf16's at the same "
                         f"tokens ({measured})")
        else:
            lines.append(f"{dtype} {what}: priced by their bytes at the data sheet's bandwidth (not measured)")
    return lines


def _architecture_assumptions(config) -> list[str]:
    """The report's lines on how MoE and MLA layers are priced (moe_steps.py, step_cost.MoeCosts / MlaCosts)."""
    from meshserve.simulator.step_cost import load_mla_costs, load_moe_costs

    model, lines = config.model_spec(), []
    if model.is_moe:
        moe = load_moe_costs(config.calibration_section)
        lines.append(f"MoE: a step reads the experts its tokens route to under uniform routing (a skewed router "
                     f"touches fewer and loads some more: not modelled), plus {moe.route_us:g} us of routing per "
                     f"MoE layer (measured) and at least {moe.floor_us:g} us per layer's expert read (fitted to W1 "
                     "Qwen3-30B-A3B on one H200)" + ("; expert parallel: each rank reads its own experts, the "
                                                     "exchange priced as TP's all-reduces" if config.layout.ep > 1
                                                     else ""))
    if model.is_mla:
        mla = load_mla_costs(config.calibration_section)
        lines.append(f"MLA: the latent cache's KV term at {mla.kv_time:g}x GQA's time per byte (our MLA decode "
                     f"kernel against the GQA one on one H200) and {mla.layer_us:g} us per layer per step (fitted to "
                     "W1 DeepSeek-V2-Lite)")
    return lines


def _fit_of(name: str) -> str:
    """"<fit>: <its model> on <its GPU>" for the report's assumptions."""
    from meshserve.simulator.step_cost import calibration_entry

    entry = calibration_entry(name)
    return f"{name}: {entry.get('model', '?')} on {entry.get('gpu', '?')}"


def _emit(report: dict, path: str | None) -> None:
    text = json.dumps(_strict(report), indent=2)
    print(text)
    if path:
        with open(path, "w") as f:
            f.write(text + "\n")


def _run_search(ns: argparse.Namespace, config, trace) -> int:
    from meshserve.simulator.config import MAX_REPLICAS
    from meshserve.simulator.search import search_layouts

    try:  # "" is no list either: it used to search --num-gpus alone
        counts = [int(x) for x in ns.search_gpus.split(",")] if ns.search_gpus is not None else [ns.num_gpus]
    except ValueError:
        raise InvalidArgumentError(f"--search-gpus {ns.search_gpus!r}: expected comma-separated GPU counts, "
                                   "e.g. 8,16", param="search_gpus") from None
    if any(n < 1 for n in counts):
        raise InvalidArgumentError("--search-gpus: counts must be >= 1", param="search_gpus")
    if max(counts) > MAX_REPLICAS:  # 100,000,000 enumerated every divisor layout into a 200 KB error line
        raise InvalidArgumentError(f"--search-gpus: counts must be <= {MAX_REPLICAS:,}", param="search_gpus")

    def progress(label: str) -> None:
        if not ns.no_progress:
            print(f"simulating {label}", file=sys.stderr)

    result = search_layouts(config, trace, counts, progress)
    result["best"] = result["ranked"][0]
    _emit(result, ns.output_json)
    return 0
