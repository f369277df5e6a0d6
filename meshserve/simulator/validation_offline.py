"""Replays of the offline runs (everything submitted at t = 0, no API process), predicted vs measured, as
markdown tables: W2 on one H200 beside the dtypes, MoE and MLA models, the two-H200 runs (W1, the decode curve,
W2 at TP=1/2 and with pipeline stages) and the tenth session's rows; the TP and pipeline host costs fitted to
them. `python -m meshserve.simulator.validation offline|pp|tenth|w2-one-gpu|moe|fit-tp|fit-pp-host` prints them
(validation.py holds the W3 replays and the goals)."""

from __future__ import annotations

import json
from pathlib import Path

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.step_cost import (
    StepWeights,
    TpCosts,
    calibration_for,
    calibration_sections,
    load_tp_costs,
)
from meshserve.simulator.trace import SimRequest
from meshserve.simulator.validation import (
    BEFORE_GRAPHS,
    GOALS,
    MIXED_GRAPHS,
    RESULTS,
    TENTH_LATENCY_OF,
    _met,
    fixed_latency_of,
    tenth_dp_rows,
)


def replay_offline(model: str, tp: int, requests: list[tuple[int, int]], gpu: str = "H200",
                   calibration: str = "default", pp: int = 1, pipeline_depth: int = 0,
                   pp_host_step_s: float | None = None, pp_round_trip_s: float | None = None,
                   pp_token_handoff: bool = False, pp_layer_partition: tuple[int, ...] | None = None,
                   tp_fused_norm: str = "", weight_dtype: str | None = None, kv_dtype: str = "bf16",
                   weights: StepWeights | None = None) -> dict:
    """requests: (prompt tokens, output tokens) all at t = 0, the engine's offline settings (bench latency and
    throughput: max_model_len 4096, max_num_seqs 256); pp stages with pipeline_depth steps in flight, the
    pipeline's host cost per step and the rest of its round trip (None: the calibration's), the token hand-off and the layer
    partition; tp_fused_norm: the fused all-reduce + norm kernel ("", pull, push); weights: step weights in place
    of the calibration's (tools/calibration_transfer.py)."""
    config = SimConfig(model=model, gpu=gpu, num_gpus=tp * pp, tp=tp, pp=pp, pipeline_depth=pipeline_depth,
                       max_model_len=4096, max_num_seqs=256, calibration=calibration,
                       pp_host_step_s=pp_host_step_s,
                       pp_round_trip_s=pp_round_trip_s, pp_token_handoff=pp_token_handoff,
                       pp_layer_partition=pp_layer_partition, tp_fused_norm=tp_fused_norm,
                       weight_dtype=weight_dtype, kv_dtype=kv_dtype)
    return simulate(config, [SimRequest(0.0, p, o) for p, o in requests], weights=weights)


# W2 on one H200 beside the dtypes (`meshserve bench throughput --model M --no-baseline --repeat N
# [--quantization fp8] [--kv-cache-dtype fp8]`, the build's default kernels): (run, model, weight dtype, KV
# dtype, the runs' JSON: "ARCHIVE.tgz:MEMBER" or a file under benchmarks/results). Each JSON's `seconds` is its
# process's median run; a row's measurement is the median over its processes. The bf16 fits are W3 step traces,
# [dtype_time]'s weights and kv a batch-1 W1 and the attention kernel's own timing; its flops is fitted to the
# last run (FITTED_W2).
ONE_GPU_W2 = (
    ("twenty-fifth session", "qwen3-0.6b", None, "bf16", ("h200_1203_s25/call3_qwen_vs_vllm/ms_w2_qwen3-0.6b.json",)),
    ("twenty-fifth session", "llama-3.1-8b", None, "bf16",
     ("h200_1203_s25/call4_8b_vs_vllm/ms_w2_llama-3.1-8b.json",)),
    ("twenty-sixth session, one tile", "qwen3-0.6b", None, "bf16",
     tuple(f"h200_1203_s26/call3_w2_bf16_tile/w1_ab.tgz:w1_ab/{i}_qwen_DECODE_TILE_legacy.json" for i in (1, 2))),
    ("twenty-sixth session", "qwen3-0.6b", None, "fp8",
     tuple(f"h200_1203_s26/call4_w2_fp8/w1_ab_qwen.tgz:w1_ab/{i}_qwen_default.json" for i in (1, 2))),
    ("twenty-sixth session", "llama-3.1-8b", "fp8", "fp8",
     ("h200_1203_s26/call4_w2_fp8/w1_ab_8b.tgz:w1_ab/1_8b_default.json",)),
    # V transposed in the fp8 cache's blocks (kernels/kv_layout.py): call 1's opt-in runs, call 2's default ones
    ("thirty-seventh session, V transposed", "qwen3-0.6b", None, "fp8",
     tuple(f"h200_1204_s37/w2_v_layout_qwen/w1_ab.tgz:w1_ab/{i}_qwen_FP8_V_LAYOUT_transposed.json" for i in (1, 2))
     + tuple(f"h200_1204_s37/w2_grid_tile_32_qwen/w1_ab.tgz:w1_ab/{i}_qwen_default.json" for i in (1, 2))),
    ("thirty-seventh session, V transposed", "llama-3.1-8b", "fp8", "fp8",
     tuple(f"h200_1204_s37/w2_v_layout_8b/w1_ab.tgz:w1_ab/{i}_8b_FP8_V_LAYOUT_transposed.json" for i in (1, 2))
     + tuple(f"h200_1204_s37/w2_grid_tile_32_8b/w1_ab.tgz:w1_ab/{i}_8b_default.json" for i in (1, 2))),
    # the balanced GQA decode kernel (kernels/triton_decode_balanced.py): the A/B's balanced processes and the
    # default build's (it is the default since), all of the thirty-ninth session's lease; no fit saw them
    ("thirty-ninth session, balanced decode", "qwen3-0.6b", None, "bf16",
     tuple(f"h200_1204_s39/call3_w2_qwen_bf16_balanced4_ab.tgz:w1_ab/{i}_qwen_DECODE_BALANCED_4.json" for i in (1, 2))
     + ("h200_1204_s39/call12_w2_qwen_bf16_new_default.tgz:w1_ab/1_qwen_default.json",
        "h200_1204_s39/call13_w2_8b_qwen_bf16_new_default.tgz:w1_ab/1_qwen_default.json")),
    ("thirty-ninth session, balanced decode", "llama-3.1-8b", None, "bf16",
     tuple(f"h200_1204_s39/call3_w2_8b_bf16_balanced4_ab.tgz:w1_ab/{i}_8b_DECODE_BALANCED_4.json" for i in (1, 2))
     + ("h200_1204_s39/call13_w2_8b_qwen_bf16_new_default.tgz:w1_ab/1_8b_default.json",)),
    ("thirty-ninth session, balanced decode", "qwen3-0.6b", None, "fp8",
     tuple(f"h200_1204_s39/call2_w2_qwen_fp8kv_balanced6_ab.tgz:w1_ab/{i}_qwen_DECODE_BALANCED_6.json" for i in (1, 2))),
    ("thirty-ninth session, balanced decode", "llama-3.1-8b", "fp8", "fp8",
     tuple(f"h200_1204_s39/call2_w2_8b_fp8_balanced6_ab.tgz:w1_ab/{i}_8b_DECODE_BALANCED_6.json" for i in (1, 2))
     + ("h200_1204_s39/call12_w2_8b_fp8_new_default.tgz:w1_ab/1_8b_default.json",)),
    # the fiftieth session (2026-12-05): the peer comparison's processes (tools/peer_side_by_side.sh, three timed
    # runs each in bf16, two with fp8) and the step-trace runs (one each): the Qwen bf16 trace gave the balanced
    # kernel's KV factor a free fit of 1.165 beside the 1.17 taken from the kernel ([h200_qwen3_0_6b_balanced])
    ("fiftieth session", "qwen3-0.6b", None, "bf16",
     ("h200_1205_s50/peer_qwen_bf16/ms_w2_qwen3-0.6b.json", "h200_1205_s50/w2_step_traces/w2_qwen3-0.6b.json")),
    ("fiftieth session", "llama-3.1-8b", None, "bf16",
     ("h200_1205_s50/peer_8b_bf16/ms_w2_llama-3.1-8b.json", "h200_1205_s50/w2_step_traces/w2_llama-3.1-8b.json")),
    ("fiftieth session", "qwen3-0.6b", None, "fp8",
     ("h200_1205_s50/peer_fp8/ms_w2_qwen3-0.6b.json", "h200_1205_s50/w2_step_traces/w2_qwen_fp8kv.json")),
    ("fiftieth session", "llama-3.1-8b", "fp8", "fp8", ("h200_1205_s50/peer_fp8/ms_w2_llama-3.1-8b.json",)),
)


FITTED_W2 = {"h200_1203_s26/call4_w2_fp8/w1_ab_8b.tgz:w1_ab/1_8b_default.json"}  # calibration.toml [dtype_time.flops]


def _result_json(name: str) -> dict:
    """A results JSON: a file under benchmarks/results, ARCHIVE.tgz:MEMBER inside one of its archives, or
    FILE.json#KEY, one entry of a JSON of several runs (meshserve_runs.json)."""
    import tarfile

    name, _, key = name.partition("#")
    archive, _, member = name.partition(".tgz:")
    if not member:
        data = json.loads((RESULTS / name).read_text())
        return data[key] if key else data
    with tarfile.open(RESULTS / (archive + ".tgz")) as tar:
        return json.load(tar.extractfile(member))


def one_gpu_w2_rows() -> list[dict]:
    """ONE_GPU_W2 replayed (W2's requests at t = 0, each model's default fit) against the measured seconds and
    KV blocks."""
    import statistics

    from meshserve.bench.workloads import w2_requests

    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    rows = []
    for run, model, weight_dtype, kv_dtype, files in ONE_GPU_W2:
        meas = [_result_json(f) for f in files]
        # (every build here before 2026-12-06: the 8B's fit of then; a model with a fit of its own takes it)
        fit = MIXED_GRAPHS if model == "llama-3.1-8b" else "default"
        pred = replay_offline(model, 1, reqs, weight_dtype=weight_dtype, kv_dtype=kv_dtype, calibration=fit)
        dtypes = f"{weight_dtype or 'bf16'} weights, {kv_dtype} KV"
        rows.append({"run": f"W2 {model}, {dtypes} ({run})", "pred": pred["duration_s"],
                     "meas": statistics.median(m["seconds"] for m in meas), "processes": [m["seconds"] for m in meas],
                     "pred_blocks": pred["kv_blocks_per_replica"], "meas_blocks": meas[0]["kv_blocks"],
                     "goal": "w2_seconds", "file": files[0], "fitted": files[0] in FITTED_W2})
    return rows


# MoE and MLA models on one GPU, bf16 (issues 23, 24): (run, model, metric, GPU, the fit, the runs' JSON, fitted).
# W1 is `bench latency` (decode tok/s), W2 `bench throughput` (seconds); several JSONs (one per process): their
# median. The fitted W1 rows are what calibration.toml's [moe] floor_us and [mla] layer_us are fitted to (the
# build now; the eleventh session's build: its own fit, [h200_moe_1201]); the W2 rows, the H100's W1 and the
# batch-256 step saw nothing of their run. "default" is the GPU's default fit (the H100's own on the H100).
_S34_W1 = "h200_1204_s34/w1_ab_call4_moe_tile.tgz:w1_ab/{}_qwen3-30b-a3b_NORM_ROW_TILE_8_8.json"
MOE_ONE_GPU = (
    ("W1 qwen3-30b-a3b (eleventh session)", "qwen3-30b-a3b", "w1", "H200", "h200_moe_1201",
     "h200_1201_s11/moe_mla/latency_model_qwen330ba3b.json", True),
    ("W1 deepseek-v2-lite (eleventh session)", "deepseek-v2-lite", "w1", "H200", "h200_moe_1201",
     "h200_1201_s11/moe_mla/latency_model_deepseekv2lite.json", True),
    ("W1 qwen3-30b-a3b (thirty-fourth session)", "qwen3-30b-a3b", "w1", "H200", "default",
     (_S34_W1.format(1), _S34_W1.format(2)), True),
    ("W1 deepseek-v2-lite (thirty-first session)", "deepseek-v2-lite", "w1", "H200", "default",
     "h200_1203_s31/call5_deepseek/w1_ab.tgz:w1_ab/1_deepseek-v2-lite_default.json", True),
    ("W2 qwen3-30b-a3b (fourteenth session)", "qwen3-30b-a3b", "w2", "H200", "default",
     "h200_1201_s14/call6/ms_w2_qwen3moe.json", False),
    ("W2 qwen3-30b-a3b (sixteenth session)", "qwen3-30b-a3b", "w2", "H200", "default",
     "h200_1202_s16/moe_mla/w2_qwen3moe_fused.json", False),
    ("W2 qwen3-30b-a3b (eighteenth session)", "qwen3-30b-a3b", "w2", "H200", "default",
     "h200_1202_s18/meshserve_runs.json#3/w2moe_pdl_0.json", False),
    ("W2 deepseek-v2-lite (sixteenth session)", "deepseek-v2-lite", "w2", "H200", "default",
     "h200_1202_s16/moe_mla/w2_dsv2lite_on.json", False),
    ("W2 deepseek-v2-lite (seventeenth session)", "deepseek-v2-lite", "w2", "H200", "default",
     "h200_1202_s17/mla/w2_dsv2lite_on.json", False),
    ("W2 deepseek-v2-lite (eighteenth session)", "deepseek-v2-lite", "w2", "H200", "default",
     "h200_1202_s18/meshserve_runs.json#4/w2_dsv2.json", False),
    ("W1 qwen3-30b-a3b (fifty-fourth session, H100)", "qwen3-30b-a3b", "w1", "H100-SXM", "default",
     "h100_1206_s54/call7_peer/ms_curve_qwen3-30b-a3b.json", False),
    ("W2 qwen3-30b-a3b (fifty-fourth session, H100)", "qwen3-30b-a3b", "w2", "H100-SXM", "default",
     "h100_1206_s54/call7_peer/ms_w2_qwen3-30b-a3b.json", False),
)


def moe_rows() -> list[dict]:
    """MOE_ONE_GPU replayed: W1 as decode tok/s of one 128-token prompt, W2 its seconds."""
    import statistics

    from meshserve.bench.workloads import W1_NEW_TOKENS, w2_requests

    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    rows = []
    for run, model, metric, gpu, fit, files, fitted in MOE_ONE_GPU:
        files = (files,) if isinstance(files, str) else files
        meas = [_result_json(f) for f in files]
        if metric == "w1":
            w1 = replay_offline(model, 1, [(128, W1_NEW_TOKENS)], gpu=gpu, calibration=fit)
            pred, got, goal = _decode_tok_s(w1, 1, W1_NEW_TOKENS), [m["decode_tok_s"] for m in meas], "w1"
        else:
            pred = replay_offline(model, 1, reqs, gpu=gpu, calibration=fit)["duration_s"]
            got, goal = [m["seconds"] for m in meas], "w2_seconds"
        rows.append({"run": run, "metric": "decode tok/s" if metric == "w1" else "seconds", "pred": pred,
                     "meas": statistics.median(got), "goal": goal, "fitted": fitted, "gpu": gpu, "fit": fit,
                     "file": files[0]})
    return rows


def moe_table() -> str:
    lines = ["| run (one GPU, bf16) | metric | fit | simulated | measured | error | goal (within 10%) | how | measured in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in moe_rows():
        lines.append(f"| {r['run']} | {r['metric']} | `{r['fit']}` | {r['pred']:.2f} | {r['meas']:.2f} | "
                     f"{r['pred'] / r['meas'] - 1:+.1%} | {'met' if _met(r['pred'], r['meas'], r['goal']) else 'missed'} | "
                     f"{'fitted' if r['fitted'] else 'check'} | `{r['file']}` |")
    return "\n".join(lines)


def one_gpu_w2_table() -> str:
    lines = ["| run (one H200) | simulated s | measured s (each process) | error | goal (within 10%) | how | KV "
             "blocks sim / measured | measured in |", "|---|---|---|---|---|---|---|---|"]
    for r in one_gpu_w2_rows():
        err = r["pred"] / r["meas"] - 1
        runs = " / ".join(f"{s:.2f}" for s in r["processes"])
        lines.append(f"| {r['run']} | {r['pred']:.2f} | {r['meas']:.2f} ({runs}) | {err:+.1%} | "
                     f"{'met' if _met(r['pred'], r['meas'], r['goal']) else 'missed'} | "
                     f"{'fitted' if r['fitted'] else 'check'} | {r['pred_blocks']:,} / {r['meas_blocks']:,} | "
                     f"`{r['file']}` |")
    return "\n".join(lines)


# W2 on one H100 (80GB HBM3), the forty-seventh session (2026-12-05, `tools/peer_side_by_side.sh MODEL`:
# `meshserve bench throughput --model M --no-baseline --repeat 3`, bf16): (model, the run's JSON under
# benchmarks/results). Priced twice: by the H100's own fits (calibration.toml's default_by_gpu: the same lease's
# decode curves, so W2 is out of sample) and by the model's H200 fit carried by the data sheet (what every GPU
# took before, and what the GPUs without fits of their own still take).
ONE_H100_W2 = (("qwen3-0.6b", "h100_1205_s47/qwen/ms_w2_qwen3-0.6b.json"),
               ("llama-3.1-8b", "h100_1205_s47/llama/ms_w2_llama-3.1-8b.json"))


def one_h100_w2_rows() -> list[dict]:
    """ONE_H100_W2 replayed on the catalog's H100-SXM with the default fit (the H100's) and with the model's
    H200 fit."""
    from meshserve.bench.workloads import w2_requests

    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    rows = []
    for model, file in ONE_H100_W2:
        meas = _result_json(file)
        pred = replay_offline(model, 1, reqs, gpu="H100-SXM")
        h200_fit = calibration_for("default", model, "H200")
        h200_fit = calibration_sections()[h200_fit] if h200_fit == "default" else h200_fit  # the alias's fit
        carried = replay_offline(model, 1, reqs, gpu="H100-SXM", calibration=h200_fit)
        rows.append({"run": f"W2 {model}, bf16 (forty-seventh session, H100)", "pred": pred["duration_s"],
                     "pred_h200_fit": carried["duration_s"], "h200_fit": h200_fit, "meas": meas["seconds"],
                     "pred_blocks": pred["kv_blocks_per_replica"], "meas_blocks": meas["kv_blocks"],
                     "goal": "w2_seconds", "file": file})
    return rows


def one_h100_w2_table() -> str:
    lines = ["| run (one H100) | simulated s: the H100's fit (default) | error | goal (within 10%) | the H200's fit by "
             "the data sheet | error | measured s | KV blocks sim / measured | measured in |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in one_h100_w2_rows():
        lines.append(f"| {r['run']} | {r['pred']:.2f} | {r['pred'] / r['meas'] - 1:+.1%} | "
                     f"{'met' if _met(r['pred'], r['meas'], r['goal']) else 'missed'} | {r['pred_h200_fit']:.2f} "
                     f"(`{r['h200_fit']}`) | {r['pred_h200_fit'] / r['meas'] - 1:+.1%} | {r['meas']:.2f} | "
                     f"{r['pred_blocks']:,} / {r['meas_blocks']:,} | `{r['file']}` |")
    return "\n".join(lines)


# The seventh session's W2 runs on one 2 x H200 host (BENCHMARKS.md "Seventh session"). That engine shared
# max_num_seqs 256 over its steps in flight (since 59a3776 each step may hold 256); for W2's 256 requests both give
# every step the same sequences (ceil(running / depth)). The TP=2 run is the one calibration.toml's TP cost per
# sequence is fitted to (fit_tp).
SEVENTH_W2 = Path("x2_pp_dp_int4_moe_h200_1130_s7")


def w2_tp2_seconds(tp_costs: TpCosts, calibration: str = MIXED_GRAPHS) -> float:
    """W2 8B at TP=2 replayed with these TP costs (the calibration's step weights)."""
    from meshserve.bench.workloads import w2_requests

    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=2, tp=2, max_model_len=4096, max_num_seqs=256,
                       calibration=calibration)
    reqs = [SimRequest(0.0, len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    return simulate(config, reqs, tp_costs=tp_costs)["duration_s"]


def fit_tp(calibration: str = MIXED_GRAPHS) -> TpCosts:
    """The calibration's TP costs with layer_seq_us refitted so that W2 8B TP=2 lasts what the seventh session
    measured: W2's schedule does not depend on time (everything at t = 0, no targets), so its time is linear in
    layer_seq_us and two replays solve it. layer_us stays as stored (a profile, not a fit)."""
    stored = load_tp_costs(calibration)
    meas = json.loads((RESULTS / SEVENTH_W2 / "w2_8b_tp2.json").read_text())["seconds"]
    t0 = w2_tp2_seconds(TpCosts(stored.layer_us, 0.0), calibration)
    t1 = w2_tp2_seconds(TpCosts(stored.layer_us, 1.0), calibration)
    return TpCosts(stored.layer_us, (meas - t0) / (t1 - t0))


# W2 8B with pipeline stages on 2 x H200 (each run's JSON says its tp, pp, --pipeline-depth, --pp-token-handoff and
# --pp-layer-partition): the seventh session's (TP=1, TP=2, PP=2 at depth 2 and 3) and the tenth's (2026-12-01: TP=1,
# PP=2 depth 3 without and with the token hand-off, and with the partition 17,15). fit_pp_host fits the pipeline's
# two host costs to the runs marked True; the others are checks.
TENTH_W2 = Path("x2_h200_1201_s10")
W2_PP_RUNS = ((SEVENTH_W2 / "w2_8b_tp1.json", False), (SEVENTH_W2 / "w2_8b_tp2.json", False),
              (SEVENTH_W2 / "w2_8b_pp2.json", True), (SEVENTH_W2 / "w2_8b_pp2_d3.json", True),
              (TENTH_W2 / "w2_8b_tp1.json", False), (TENTH_W2 / "w2_8b_pp2_d3.json", False),
              (TENTH_W2 / "w2_8b_pp2_d3_ho.json", True), (TENTH_W2 / "w2_8b_pp2_d3_ho_part.json", False))


def _w2_replay(meas: dict, host: tuple[float | None, float | None] = (None, None)) -> dict:
    """W2 replayed with a measured run's layout and pipeline flags; host: (host_step_s, round_trip_s), None: the
    calibration's."""
    from meshserve.bench.workloads import w2_requests

    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    partition = meas.get("pp_layer_partition")
    return replay_offline("llama-3.1-8b", meas["tp"], reqs, pp=meas["pp"], pipeline_depth=meas.get("pipeline_depth") or 0,
                          pp_host_step_s=host[0], pp_round_trip_s=host[1],
                          pp_token_handoff=bool(meas.get("pp_token_handoff")),
                          pp_layer_partition=tuple(partition) if partition else None, calibration=MIXED_GRAPHS)


def _w2_label(meas: dict) -> str:
    if meas["pp"] == 1:
        return f"TP={meas['tp']}"
    label = f"PP={meas['pp']} depth {meas.get('pipeline_depth') or meas['pp']}"
    if meas.get("pp_token_handoff"):
        label += ", token hand-off"
    if meas.get("pp_layer_partition"):
        label += f", layers {','.join(map(str, meas['pp_layer_partition']))}"
    return label


def pp_rows(host: tuple[float | None, float | None] = (None, None)) -> list[dict]:
    """W2 at TP=1, TP=2 and PP=2 (W2_PP_RUNS), simulated with the default fit and the pipeline's host costs
    (host: (host_step_s, round_trip_s); None: calibration.toml's), against the measured runs; the PP rows' bubble
    beside the one the engine measured on the last stage."""
    rows = []
    for path, fitted in W2_PP_RUNS:
        meas = json.loads((RESULTS / path).read_text())
        pred = _w2_replay(meas, host)
        session = "seventh" if path.parent == SEVENTH_W2 else "tenth"
        rows.append({"run": f"W2 llama-3.1-8b {_w2_label(meas)} ({session})", "file": str(path),
                     "pred": pred["duration_s"], "meas": meas["seconds"], "goal": "w2_seconds", "fitted": fitted,
                     "pred_bubble": pred["pipeline"]["bubble"] if pred["pipeline"] else None,
                     "meas_bubble": meas.get("pp_bubble"), "steps": pred["steps"]})
    return rows


def fit_pp_host(step_ms: tuple[float, ...] = tuple(x / 10 for x in range(20, 61, 5)),
                round_trip_ms: tuple[float, ...] = tuple(x / 10 for x in range(0, 31, 5)),
                refine: bool = True) -> tuple[float, float, float]:
    """(host_step_ms, round_trip_ms, rms relative error) minimizing the W2 PP runs marked fitted in W2_PP_RUNS,
    over a grid (then a 0.1 ms grid around its best when refine). A pipelined replay is not linear in either
    cost (which steps are in flight depends on when each returns), hence the search."""
    runs = [json.loads((RESULTS / path).read_text()) for path, fitted in W2_PP_RUNS if fitted]

    def rms(h: float, r: float) -> float:
        errs = [_w2_replay(m, (h * 1e-3, r * 1e-3))["duration_s"] / m["seconds"] - 1 for m in runs]
        return (sum(e * e for e in errs) / len(errs)) ** 0.5

    best = min((rms(h, r), h, r) for h in step_ms for r in round_trip_ms)
    if refine:
        _, h0, r0 = best
        near = [round(x / 10, 1) for x in range(-4, 5)]
        best = min([best] + [(rms(h0 + dh, r0 + dr), round(h0 + dh, 1), round(r0 + dr, 1)) for dh in near for dr in near
                             if h0 + dh >= 0 and r0 + dr >= 0])
    err, h, r = best
    return h, r, err


def pp_table(hosts: tuple[tuple[float | None, float | None], ...] = ((None, None), (0.0, 0.0))) -> str:
    """Markdown: W2 at TP=1/2 and PP=2 (W2_PP_RUNS) predicted vs measured, with the pipeline's host costs from
    calibration.toml and without them (0: the stages alone set the pace)."""
    from meshserve.simulator.pipeline import load_host_costs

    head = ""
    for step_s, trip_s in hosts:
        stored = load_host_costs()
        step = (stored.step_s if step_s is None else step_s) * 1e3
        trip = (stored.round_trip_s if trip_s is None else trip_s) * 1e3
        head += f" seconds sim / measured (error), host {step:g} ms + round trip {trip:g} ms | bubble sim / measured |"
    lines = [f"| run (2 x H200) |{head} goal (W2 within 10%) | measured in |",
             "|---|" + "---|---|" * len(hosts) + "---|---|"]
    for rows in zip(*(pp_rows(h) for h in hosts)):
        cells = []
        for r in rows:
            cells.append(f"{r['pred']:.2f} / {r['meas']:.2f} ({(r['pred'] - r['meas']) / r['meas']:+.1%})")
            cells.append("-" if r["pred_bubble"] is None else f"{r['pred_bubble']:.2f} / {r['meas_bubble']:.2f}")
        r = rows[0]
        met = "met" if _met(r["pred"], r["meas"], r["goal"]) else "missed"
        how = "fitted" if r["fitted"] else "check"
        lines.append(f"| {r['run']} | {' | '.join(cells)} | {met} (first columns; {how}) | `{r['file']}` |")
    return "\n".join(lines)


def _decode_tok_s(report: dict, batch: int, new_tokens: int) -> float:
    """bench latency's decode rate: (N - 1) tokens per sequence after the first, over their time."""
    return batch * (new_tokens - 1) / (report["e2e_p50"] - report["ttft_p50"])


def offline_rows(calibration: str = MIXED_GRAPHS) -> list[dict]:
    """Predicted vs measured for the two-GPU offline runs that the simulator can replay (TP; PP is not
    simulated: its row says so)."""
    from meshserve.bench.workloads import W1_NEW_TOKENS, w2_requests

    rows = []
    for model, tp, file in (("llama-3.1-8b", 1, "w1_8b_tp1_h200x2.json"), ("llama-3.1-8b", 2, "w1_8b_tp2_h200x2.json"),
                            ("llama-3.1-70b", 2, "w1_70b_tp2_h200x2.json")):
        meas = json.loads((RESULTS / file).read_text())
        w1 = replay_offline(model, tp, [(128, W1_NEW_TOKENS)], calibration=calibration)
        rows.append({"run": f"W1 {model} TP={tp} batch 1", "metric": "decode tok/s", "file": file,
                     "pred": _decode_tok_s(w1, 1, W1_NEW_TOKENS), "meas": meas["decode_tok_s"], "goal": "w1"})
        for batch, tok_s in meas.get("decode_tok_s_by_batch", {}).items():
            if int(batch) == 1:
                continue
            curve = replay_offline(model, tp, [(128, 128)] * int(batch), calibration=calibration)
            rows.append({"run": f"{model} TP={tp} decode batch {batch}", "metric": "decode tok/s", "file": file,
                         "pred": _decode_tok_s(curve, int(batch), 128), "meas": tok_s, "goal": "w1"})
    reqs = [(len(r.prompt_token_ids), r.max_tokens) for r in w2_requests()]
    for tp, file in ((1, "w2_8b_tp1_h200x2.json"), (2, "w2_8b_tp2_h200x2.json")):
        meas = json.loads((RESULTS / file).read_text())
        w2 = replay_offline("llama-3.1-8b", tp, reqs, calibration=calibration)
        rows.append({"run": f"W2 llama-3.1-8b TP={tp}", "metric": "seconds", "file": file,
                     "pred": w2["duration_s"], "meas": meas["seconds"], "goal": "w2_seconds"})
    pp = json.loads((RESULTS / "w2_8b_pp2_h200x2.json").read_text())
    rows.append({"run": "W2 llama-3.1-8b PP=2", "metric": "seconds", "file": "w2_8b_pp2_h200x2.json",
                 "pred": None, "meas": pp["seconds"], "goal": "w2_seconds"})  # an engine before 90673be: pp_table
    return rows


# W1 8B batch 1 of the tenth session (2026-12-01, 2 x H200): TP=1, TP=2 (one-shot all-reduce) and TP=2 with the
# fused all-reduce + add + RMSNorm (MESHSERVE_TP_FUSED_NORM=pull / push); (file, tp, fused_norm). The push run left
# no JSON in the results: its figure (output tok/s, as `bench latency` prints it) is the session's report.
TENTH_W1 = (("x2_h200_1201_s10/w1_8b_tp1.json", 1, ""), ("x2_h200_1201_s10/w1_8b_tp2.json", 2, ""),
            ("x2_h200_1201_s10/w1_8b_tp2_fused_pull.json", 2, "pull"), (None, 2, "push"))
TENTH_W1_PUSH_TOK_S = 316.1


def tenth_w1_rows() -> list[dict]:
    """W1 8B batch 1 (TENTH_W1) predicted vs measured output tok/s (the whole request: prefill + decode, as the
    measured tok_s; nothing fitted to these runs: the fused kernel's saving is its all-reduce bench's)."""
    from meshserve.bench.workloads import W1_NEW_TOKENS

    rows = []
    for file, tp, fused in TENTH_W1:
        meas = json.loads((RESULTS / file).read_text())["tok_s"] if file else TENTH_W1_PUSH_TOK_S
        w1 = replay_offline("llama-3.1-8b", tp, [(128, W1_NEW_TOKENS)], tp_fused_norm=fused, calibration=MIXED_GRAPHS)
        label = f"TP={tp}" + (f", fused all-reduce + norm ({fused})" if fused else "")
        rows.append({"run": f"W1 llama-3.1-8b {label}", "file": file or "(session report)",
                     "pred": W1_NEW_TOKENS / w1["e2e_p50"], "meas": meas, "goal": "w1"})
    return rows


def tenth_table() -> str:
    """Markdown: every measured row of the tenth session (2026-12-01, 2 x H200), predicted vs measured, with the
    seventh session's W2 PP runs the pipeline's host costs are fitted to: W1 8B (goal 10%), W2 8B (seconds, 10%),
    W3 goodput (10%) with TTFT p50 / p99 beside it."""
    lines = ["| run (2 x H200) | metric | predicted | measured | error | goal | how | measured in |",
             "|---|---|---|---|---|---|---|---|"]

    def line(run: str, metric: str, pred: float, meas: float, goal: str, how: str, file: str,
             fmt: str = ".1f") -> None:
        err = (pred - meas) / meas if meas else float("nan")
        bound = GOALS[goal]
        verdict = f"{'met' if _met(pred, meas, goal) else 'missed'} (within {bound:.0%})"
        lines.append(f"| {run} | {metric} | {pred:,{fmt}} | {meas:,{fmt}} | {err:+.1%} | {verdict} | {how} | "
                     f"`{file}` |")

    for r in tenth_w1_rows():
        line(r["run"], "output tok/s", r["pred"], r["meas"], "w1", "check", r["file"])
    for r in pp_rows():
        if r["file"].endswith("tp2.json"):
            continue  # the TP cost's own fit (the offline table)
        how = "fitted (host costs)" if r["fitted"] else "check"
        line(r["run"], "seconds", r["pred"], r["meas"], "w2_seconds", how, r["file"], ".2f")
    latency = fixed_latency_of(TENTH_LATENCY_OF)
    for r in tenth_dp_rows(latency):
        p, m, run = r["pred"], r["meas"], f"{r['run']}, QPS {r['qps']:g}"
        busy = "" if r["router_busy"] is None else f"; router busy {r['router_busy']:.0%} (sim)"
        how = f"check; fixed latency {latency * 1e3:.0f} ms ({TENTH_LATENCY_OF}'s)"
        if r["router_busy"] is not None:  # the router of then: before httptools / uvloop (a54870b)
            how += "; history: the router before httptools / uvloop (the one that ships: `validation dp-router`)"
        line(run, "goodput req/s", p["goodput"], m["goodput"], "goodput", how + busy, r["file"])
        line(run, "TTFT p50 ms", p["ttft_p50"] * 1e3, m["ttft_p50"] * 1e3, "ttft_p50", how, r["file"], ".0f")
        line(run, "TTFT p99 ms", p["ttft_p99"] * 1e3, m["ttft_p99"] * 1e3, "ttft_p99", how, r["file"], ".0f")
    return "\n".join(lines)


def offline_table(calibrations: tuple[str, ...] = (MIXED_GRAPHS, BEFORE_GRAPHS)) -> str:
    """One simulated / measured column and its goal per fit: the runs predate mixed-step graphs, whose fit is
    the second; W1's decode steps are graphed in both engines."""
    head = "".join(f" simulated / measured (error), fit {c} | goal |" for c in calibrations)
    lines = [f"| run (2 x H200 host) | metric |{head} measured in |", "|---|---|" + "---|---|" * len(calibrations) + "---|"]
    for rows in zip(*(offline_rows(c) for c in calibrations)):
        cells = []
        for r in rows:
            if r["pred"] is None:
                cells += [f"- / {r['meas']:.2f}",
                          "not replayed (the engine before 90673be's pipeline fix; pp_table)"]
            else:
                cells += [f"{r['pred']:.2f} / {r['meas']:.2f} ({(r['pred'] - r['meas']) / r['meas']:+.1%})",
                          ("met" if _met(r["pred"], r["meas"], r["goal"]) else "missed")
                          + f" (within {GOALS[r['goal']]:.0%})"]
        r = rows[0]
        lines.append(f"| {r['run']} | {r['metric']} | {' | '.join(cells)} | `{r['file']}` |")
    return "\n".join(lines)
