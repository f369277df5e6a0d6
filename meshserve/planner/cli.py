"""`meshserve plan`: memory, layout, speed and cost for a model on given GPUs; also calibration and claims."""

from __future__ import annotations

import argparse
import json
import math

from meshserve.errors import InvalidArgumentError
from meshserve.models.presets import HF_IDS, preset_names
from meshserve.planner.detect import DEFAULT_GPU, choose_gpu
from meshserve.planner.memory import (
    DEFAULT_GPU_MEMORY_UTILIZATION,
    DEFAULT_MAX_NUM_SEQS,
    KV_DTYPE_BYTES,
    WEIGHT_DTYPE_BYTES,
)
from meshserve.planner.perf import Workload
from meshserve.planner.plan import OBJECTIVES


def register(subparsers) -> None:
    """Add the `plan` subcommand to meshserve's argument parser."""
    p = subparsers.add_parser("plan", help="capacity planner: memory, TP/PP/DP layout, speed and $/1M tokens",
                              description="Predict memory per GPU, choose a parallel layout and estimate "
                                          "TTFT, ITL, tok/s and $/1M output tokens (arithmetic, no GPU needed).")
    p.add_argument("model", nargs="?",
                   help=f"preset ({', '.join(preset_names())}), an HF id of one (e.g. {HF_IDS['smollm2-135m'][-1]}),"
                        " or a config.json path or folder")
    p.add_argument("--gpu", default=None,
                   help=f"GPU name from the catalog (see --list-gpus); default: this machine's GPU, else {DEFAULT_GPU}")
    p.add_argument("--num-gpus", type=int, default=1, help="GPUs in all (default 1)")
    p.add_argument("--nodes", type=int, default=1, help="nodes the GPUs are spread over (default 1)")
    p.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    p.add_argument("--concurrency", type=int, default=None,
                   help="concurrent sequences in all (default: as many as fit, or 1 with --objective latency)")
    p.add_argument("--dtype", choices=sorted(WEIGHT_DTYPE_BYTES), default=None,
                   help="weight dtype (default: the checkpoint's)")
    p.add_argument("--kv-dtype", choices=sorted(KV_DTYPE_BYTES), default="bf16")
    p.add_argument("--input-len", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=256, help="generated tokens per request")
    p.add_argument("--objective", choices=OBJECTIVES, default="throughput", help="how layouts are ranked")
    p.add_argument("--tp", type=int, default=None, help="only layouts with this tensor-parallel size")
    p.add_argument("--pp", type=int, default=None, help="only layouts with this pipeline-parallel size")
    p.add_argument("--dp", type=int, default=None, help="only layouts with this data-parallel size")
    p.add_argument("--max-num-seqs", type=int, default=DEFAULT_MAX_NUM_SEQS)
    p.add_argument("--pipeline-depth", type=int, default=0,
                   help="steps in flight with PP, each up to --max-num-seqs sequences (default 0: one per stage)")
    p.add_argument("--pp-token-handoff", action="store_true",
                   help="PP with the engine's --pp-token-handoff (TP 1): sampled ids passed on the device")
    p.add_argument("--pp-host-step-ms", type=float, default=None,
                   help="PP: the engine core's time per pipelined step (default: the simulator's fit on 2 x H200)")
    p.add_argument("--pp-round-trip-ms", type=float, default=None,
                   help="PP: the rest of a step's round trip through the host (default: the same fit)")
    p.add_argument("--gpu-memory-utilization", type=float, default=DEFAULT_GPU_MEMORY_UTILIZATION)
    p.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (saves their memory)")
    p.add_argument("--efficiency", type=float, default=None, help="override the catalog's GPU efficiency")
    p.add_argument("--hardware-file", default=None, help="TOML with GPU entries overriding/adding to the catalog")
    p.add_argument("--claim", type=float, default=None, metavar="TOKS",
                   help="check a claimed decode tok/s against the chosen layout's roofline")
    p.add_argument("--calibrate", default=None, metavar="BENCH_JSON",
                   help="fit per-GPU efficiency from `meshserve bench` JSON and show predicted vs measured")
    p.add_argument("--list-gpus", action="store_true", help="print the GPU catalog and exit")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run_plan)


def run_plan(ns: argparse.Namespace) -> int:
    """Entry point of `meshserve plan`; returns 1 when nothing fits or a claim is impossible."""
    from meshserve.planner.hardware import load_catalog

    catalog = load_catalog(ns.hardware_file)
    if ns.list_gpus:
        return _list_gpus(catalog, ns.json)
    if ns.calibrate:
        return _calibrate(ns, catalog)
    if not ns.model:
        raise InvalidArgumentError("plan needs a MODEL (preset, HF id or config.json), or --calibrate/--list-gpus")
    from meshserve.planner.claim import check_claim
    from meshserve.planner.model import load_model
    from meshserve.planner.plan import PlanRequest, make_plan
    from meshserve.planner.report import render_plan

    pinned = (ns.tp or 1) * (ns.pp or 1) * (ns.dp or 1)  # a layout uses every GPU: TP x PP x DP = --num-gpus
    if ns.num_gpus >= 1 and min(ns.tp or 1, ns.pp or 1, ns.dp or 1) >= 1 and (
            ns.num_gpus % pinned or (None not in (ns.tp, ns.pp, ns.dp) and pinned != ns.num_gpus)):
        raise InvalidArgumentError(f"--tp/--pp/--dp pin {pinned} GPUs per layout, which cannot use all --num-gpus "
                                   f"{ns.num_gpus} (TP x PP x DP = the GPUs)", param="num_gpus")
    if ns.claim is not None and not 0 < ns.claim < math.inf:
        raise InvalidArgumentError(f"--claim must be a decode rate > 0 tok/s, got {ns.claim}", param="claim")
    model = load_model(ns.model)  # before choose_gpu, which may take seconds to ask torch
    if ns.max_model_len is not None and ns.max_model_len > model.max_position_embeddings:  # as serve refuses it
        raise InvalidArgumentError(f"--max-model-len {ns.max_model_len:,} exceeds {model.name}'s context of "
                                   f"{model.max_position_embeddings:,} tokens", param="max_model_len")
    choice = choose_gpu(ns.gpu, catalog)
    gpu = choice.gpu
    result = make_plan(PlanRequest(
        model=model, gpu=gpu, num_gpus=ns.num_gpus, nodes=ns.nodes,
        max_model_len=ns.max_model_len, concurrency=ns.concurrency, weight_dtype=ns.dtype, kv_dtype=ns.kv_dtype,
        workload=Workload(ns.input_len, ns.output_len), objective=ns.objective, max_num_seqs=ns.max_num_seqs,
        pipeline_depth=ns.pipeline_depth, pipeline_host=_pipeline_host(ns), pp_token_handoff=ns.pp_token_handoff,
        gpu_memory_utilization=ns.gpu_memory_utilization, enforce_eager=ns.enforce_eager,
        efficiency=ns.efficiency, tp=ns.tp, pp=ns.pp, dp=ns.dp))
    verdict = check_claim(result.best, ns.claim, gpu.hbm_gb_s) if ns.claim is not None and result.best else None
    if ns.json:
        out = {**result.to_dict(), "gpu_source": choice.note or "--gpu"}
        if verdict is not None:
            out["claim"] = {"claimed_tok_per_s": verdict.claimed_tok_per_s, "impossible": verdict.impossible,
                            "roofline_tok_per_s": verdict.roofline_tok_per_s, "message": verdict.message}
        print(json.dumps(out, indent=2))
    else:
        print(render_plan(result, gpu_note=choice.note))
        if verdict is not None:
            print(f"claim: {verdict.message}")
    return 0 if result.best and not (verdict and verdict.impossible) else 1


def _pipeline_host(ns: argparse.Namespace):
    """The PP host costs: the fitted pair (pipeline_host.fitted_host) with any --pp-*-ms override."""
    from meshserve.planner.pipeline_host import PipelineHost, fitted_host

    fit = fitted_host()
    for flag, value in (("--pp-host-step-ms", ns.pp_host_step_ms), ("--pp-round-trip-ms", ns.pp_round_trip_ms)):
        if value is not None and not 0 <= value < math.inf:  # NaN too
            raise InvalidArgumentError(f"{flag} must be >= 0 and finite, got {value}", param=flag[2:])
    return PipelineHost(fit.step_s if ns.pp_host_step_ms is None else ns.pp_host_step_ms / 1e3,
                        fit.round_trip_s if ns.pp_round_trip_ms is None else ns.pp_round_trip_ms / 1e3)


def _list_gpus(catalog: dict, as_json: bool) -> int:
    import dataclasses

    if as_json:
        print(json.dumps({name: dataclasses.asdict(g) for name, g in catalog.items()}, indent=2))
        return 0
    print(f"{'GPU':<16}{'GiB':>7}{'HBM GB/s':>10}{'bf16 TF':>9}{'fp8 TF':>8}  {'link':<24}{'GB/s':>6}"
          f"{'/node':>6}{'$/h*':>7}{'eff':>6}")
    for g in catalog.values():
        fp8 = f"{g.fp8_tflops:.0f}" if g.fp8_tflops else "-"
        print(f"{g.name:<16}{g.memory_gib:>7.1f}{g.hbm_gb_s:>10,.0f}{g.bf16_tflops:>9,.0f}{fp8:>8}  {g.link:<24}"
              f"{g.link_gb_s:>6,.0f}{g.gpus_per_node:>6}{g.price_per_hour_usd:>7.2f}{g.efficiency:>6.2f}")
    print("* hourly prices are assumptions; edit gpus.toml or pass --hardware-file")
    return 0


def _calibrate(ns: argparse.Namespace, catalog: dict) -> int:
    from meshserve.planner.calibrate import calibrate, calibration_markdown, read_bench_rows

    cal = calibrate(read_bench_rows(ns.calibrate), catalog)
    if ns.json:
        import dataclasses

        print(json.dumps({"factors": cal.factors, "layer_overhead_us": cal.overheads_us,
                          "rows": [{**dataclasses.asdict(r), "error": r.error} for r in cal.rows]}, indent=2))
        return 0
    print(calibration_markdown(cal))
    print("\nTo use these, add to a --hardware-file (or gpus.toml):")
    for name, factor in sorted(cal.factors.items()):
        print(f"[gpus.{name}]\nefficiency = {factor:.3f}\n"
              f"layer_overhead_us = {cal.overheads_us.get(name, 0.0):.0f}")
    return 0
