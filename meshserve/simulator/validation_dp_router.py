"""W3 through the router in front of DP=2 with emulated devices (tools/router_dp_emulated.sh), replayed.

The run: two replicas of the real server and the real EngineCore whose forward is removed and whose device is
emulated (bench/real_core.py: a step lasts base + per token x new tokens + per context token x KV tokens), behind
one `meshserve router` process (least outstanding), W3 with targets from a 4-process client, on the GPU host's
CPUs; first W3 at a light QPS straight to one replica. The replay gives the simulator the same device (its step
cost is the run's EmulatedDevice), the engine's step-time predictor as the run's cores converged to it (the
least-squares fit of their step traces: what SLO admission and shedding predict with), the run's KV blocks, the
API process's costs of the GPU host (frontend.FRONTEND_H200) and the router's (router_calibration.toml's default,
fitted on an earlier run's rows: held out); the table also shows the replicas' admission margins, simulated /
measured, beside each other where the run read them. What is compared is then the simulator's model of the router, the
routing, the API processes and the schedulers, with the GPU's time taken out of the question (the replicas'
GPU steps are validated on their own: validation.py's W3 and DP=2 rows).

The fixed latency (network, HTTP, the hop to the core) is fitted on the direct run (measured TTFT p50 less
simulated) and used for every router row, as validation_router_host does.

    python -m meshserve.simulator.validation_dp_router table DIR     # DIR: router_dp.tgz's folder (or unpacked)
    python -m meshserve.simulator.validation_dp_router summary DIR   # the measurement alone (the device's print)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from meshserve.bench.real_core import EmulatedDevice
from meshserve.engine.step_time import DeviceRates
from meshserve.planner.hardware import get_gpu
from meshserve.planner.memory import kv_bytes_per_token, weight_bytes
from meshserve.planner.model import load_model
from meshserve.router.config import RouterConfig
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_H200
from meshserve.simulator.router_node import ROUTER_OFF, RouterCosts, load_router_costs, router_calibration_name
from meshserve.simulator.step_cost import StepWeights, fit_step_weights
from meshserve.simulator.trace import w3_trace
from meshserve.simulator.validation_router_host import Results, _refused, cpu_between, metric_cells

ARCHIVE, UNPACKED = "router_dp.tgz", "dp2_router"
# the fifty-fifth session's run and its two repeats within the hour, the last with the replicas' admission margins
# (2026-12-06, the 16-core Xeon hosts of three H100 leases; no GPU used), under RESULTS
STORED_RUNS = ("gpuhost_1206_s55/router_dp", "gpuhost_1206_s55/router_dp_repeat",
               "gpuhost_1206_s55/router_dp_margins")
GPU = "H200"  # the device the emulation stands for (its prior, the catalog rates the predictor's terms use)
METRICS = ("goodput", "ttft_p50", "ttft_p99", "tpot_p50")


def open_results(folder: str | Path) -> Results:
    return Results(folder, ARCHIVE, UNPACKED)


def device_of(env: dict[str, str]) -> EmulatedDevice:
    """The run's emulated device (env.txt's three numbers)."""
    try:
        return EmulatedDevice(float(env["device_base_ms"]) * 1e-3, float(env["device_us_per_token"]) * 1e-6,
                              float(env["device_us_per_context_token"]) * 1e-6)
    except (KeyError, ValueError) as e:
        raise SystemExit(f"env.txt: no emulated device ({e!r})") from None


def converged_weights(results: Results, model: str) -> tuple[StepWeights, float, int]:
    """The step-time predictor the run's cores converged to: the least-squares fit of every core's step trace
    (both replicas of the router run), with its mean error and the steps it saw."""
    rows = [r for name in ("a", "b") for r in results.jsonl(f"{UNPACKED}/steps_{name}.jsonl")]
    if not rows:
        raise SystemExit(f"{results.folder}: no step traces ({UNPACKED}/steps_a.jsonl, steps_b.jsonl)")
    spec, gpu = load_model(model), get_gpu(GPU)
    weights, err = fit_step_weights(rows, weight_bytes(spec), kv_bytes_per_token(spec),
                                    DeviceRates(gpu.hbm_bytes_per_s, gpu.flops_per_s("bf16")))
    return weights, err, len(rows)


def replay(point: dict, replicas: int, device: EmulatedDevice, weights: StepWeights, num_blocks: int,
           router: RouterCosts = ROUTER_OFF, core_latency_s: float = 0.0, model: str = "llama-3.1-8b") -> dict:
    """One measured W3 point: its QPS and request count (W3's arrivals, seed 1000 + QPS), `replicas` of one API
    process each, targets on, the emulated device as every step's cost, the router node at `router` (ROUTER_OFF:
    none) with the router's --max-outstanding, the fixed latency inside the server's TTFT clock (as
    validation_router_host.replay)."""
    qps = float(point["qps"])
    config = SimConfig(model=model, gpu=GPU, num_gpus=replicas, max_model_len=4096, num_blocks=num_blocks,
                       core_latency_s=core_latency_s, slo_ttft_s=1.0, slo_tpot_s=0.05,
                       frontend_request_s=FRONTEND_H200.per_request_s, frontend_token_s=FRONTEND_H200.per_token_s,
                       frontend_refusal_s=FRONTEND_H200.per_refusal_s, router_request_s=router.per_request_s,
                       router_event_s=router.per_event_s, router_refusal_s=router.per_refusal_s,
                       max_outstanding=RouterConfig().max_outstanding if router.enabled else None,
                       frontend_stalls=False, seed=1000 + int(qps))
    return simulate(config, w3_trace(qps, int(point["num_requests"])), weights=weights, step_cost=device.time_s,
                    eager=None)


def point_busy(results: Results, run: str, point: dict, names: tuple[str, ...]) -> dict[str, float]:
    """Each named process tree's measured CPU over the point's wall window, as a fraction of a core (the router;
    serve_a / serve_b: the replica's root process, its API process, without the core below it)."""
    t0, t1 = point.get("wall_start"), point.get("wall_end")
    out: dict[str, float] = {}
    if t0 is None or t1 is None or t1 <= t0:
        return out
    for name in names:
        log = results.jsonl(f"{run}/proc_cpu_{name}.jsonl")
        if not log:
            continue
        pid = None
        if name != "router":  # the API process: the log's root, not the engine core it started
            pid = next((k for k, p in log[0]["procs"].items() if "child of" not in p["process"]), None)
        cpu = cpu_between(log, t0, t1, pid)
        if cpu is not None:
            out[name] = cpu / (t1 - t0)
    return out


REPLICA_PORTS = (8001, 8002)  # tools/router_dp_emulated.sh's replicas a and b


def measured_margins(results: Results, run: str, qps: float) -> list[float]:
    """Each replica's admission margin after the point (the script's metrics_PORT_QPS.txt; none in runs before
    it scraped them)."""
    out = []
    for port in REPLICA_PORTS:
        for line in (results.text(f"{run}/metrics_{port}_{qps:g}.txt") or "").splitlines():
            name, _, value = line.partition(" ")
            if name.split("{")[0] == "meshserve:admission_margin":
                out.append(float(value))
    return out


def replay_rows(results: Results) -> list[dict]:
    """The direct run's points (one replica, no router node; its lightest fits the fixed latency) and the router
    run's (two replicas, with the default router costs and without a router node), each replayed."""
    env = results.env()
    model, device = env.get("model", "llama-3.1-8b"), device_of(env)
    num_blocks = int(env.get("num_blocks", "0")) or None
    weights, err, steps = converged_weights(results, model)
    direct = results.json("direct/w3.json")
    routed = results.json(f"{UNPACKED}/w3.json")
    if not direct or not routed:
        raise SystemExit(f"{results.folder}: direct/w3.json and {UNPACKED}/w3.json are both needed")
    light = min(direct["points"], key=lambda p: p["qps"])
    latency = max(0.0, light["ttft_p50"] - replay(light, 1, device, weights, num_blocks, model=model)["ttft_p50"])
    default = router_calibration_name()
    rows = []
    for run, label, replicas, points, settings in (
            ("direct", "direct, one replica", 1, direct["points"], (("-", ROUTER_OFF),)),
            (UNPACKED, "DP=2 through the router", 2, routed["points"],
             ((f"{default} (held out)", load_router_costs(default)), ("no router node", ROUTER_OFF)))):
        for point in sorted(points, key=lambda p: p["qps"]):
            busy = point_busy(results, run, point, ("router", "serve_a", "serve_b"))
            margins = measured_margins(results, run, float(point["qps"]))
            for setting, costs in settings:
                pred = replay(point, replicas, device, weights, num_blocks, costs, latency, model)
                rows.append({"run": label, "qps": float(point["qps"]), "setting": setting, "pred": pred,
                             "meas": point, "busy": busy, "fitted": point is light, "margins": margins})
    for r in rows:
        r.update(latency_s=latency, weights=weights, weights_err=err, steps=steps)
    return rows


def table(results: Results) -> str:
    from meshserve.simulator.validation import _met

    rows = replay_rows(results)
    w = rows[0]["weights"]
    lines = [f"Fixed latency {rows[0]['latency_s'] * 1e3:.1f} ms (fitted on the direct run's lightest point); the "
             f"cores' converged predictor: constant {w.constant_ms:.3f} ms, dense {w.dense_factor:.3f}, KV "
             f"{w.kv_factor:.3f}, mixed {w.mixed_ms:.3f} ms ({rows[0]['steps']:,} steps, mean error "
             f"{rows[0]['weights_err']:.1%}). Cells simulated / measured.", "",
             "| run (devices emulated) | QPS | router costs | goodput req/s | TTFT p50 ms | TTFT p99 ms | "
             "TPOT p50 ms | 429s | router busy | API processes busy | admission margin | goals met |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m, busy = r["pred"], r["meas"], r["busy"]
        node = p.get("router_node") or {}
        sim_router = f"{node['busy_fraction']:.0%}" if node else "-"
        router = f"{sim_router} / {busy['router']:.0%}" if "router" in busy else f"{sim_router} / -"
        api_meas = [busy[k] for k in ("serve_a", "serve_b") if k in busy]
        api = (f"{p['frontend']['busy_fraction']:.0%} / "
               + (" + ".join(f"{b:.0%}" for b in api_meas) if api_meas else "-"))
        met = [k for k in METRICS if _met(p[k], m[k], k)]
        mark = " (fixed latency fitted here)" if r["fitted"] else ""
        margin = " + ".join(f"{v:.2f}" for v in p["slo_scheduling"]["admission_margin"] if v is not None) or "-"
        margin += " / " + (" + ".join(f"{v:.2f}" for v in r["margins"]) or "-")
        lines.append(f"| {r['run']}{mark} | {r['qps']:g} | {r['setting']} | {metric_cells(p, m)} | "
                     f"{p['failed']} / {_refused(m)} | {router} | {api} | {margin} | {', '.join(met) or 'none'} |")
    return "\n".join(lines)


def summary(results: Results) -> str:
    """The measurement alone: each point's served, refused, goodput, latencies and the processes' CPU."""
    env = results.env()
    lines = [f"host: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; router source "
             f"{env.get('router_source_sha1', '?')}; {env.get('fast_http', '?')}"]
    for run in ("direct", UNPACKED):
        data = results.json(f"{run}/w3.json")
        for p in (data or {}).get("points", []):
            busy = point_busy(results, run, p, ("router", "serve_a", "serve_b"))
            lines.append(f"{run} QPS {p['qps']:g}: {p['completed']}/{p['num_requests']} ok ({_refused(p)} 429), "
                         f"goodput {p['goodput']:.1f} req/s, TTFT p50 {p['ttft_p50'] * 1e3:.0f} ms p99 "
                         f"{p['ttft_p99'] * 1e3:.0f} ms, TPOT p50 {p['tpot_p50'] * 1e3:.1f} ms; busy "
                         + ", ".join(f"{k} {v:.0%}" for k, v in busy.items()))
        for name in ("a", "b"):
            steps = results.jsonl(f"{run}/steps_{name}.jsonl")
            if steps:
                lines.append(f"{run} core {name}: {len(steps):,} steps")
    return "\n".join(lines)


def stored_table() -> str:
    """The tables of STORED_RUNS (`python -m meshserve.simulator.validation dp-router`)."""
    from meshserve.simulator.validation import RESULTS

    return "\n\n".join(f"W3 through the router in front of DP=2, the devices emulated ({run}):\n\n"
                       + table(open_results(RESULTS / run)) for run in STORED_RUNS)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshserve.simulator.validation_dp_router",
                                description="W3 through the router in front of DP=2, devices emulated, replayed")
    p.add_argument("what", choices=["table", "summary"])
    p.add_argument("dir", help="tools/router_dp_emulated.sh's results (router_dp.tgz, unpacked or not)")
    ns = p.parse_args(argv)
    results = open_results(ns.dir)
    print(table(results) if ns.what == "table" else summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
