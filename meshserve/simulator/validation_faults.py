"""Replay of the router fault suite's kill+restart load (faults.py) against its measured rounds.

Measured by tools/fault_load_trace.py (benchmarks/results/router_faults_cpu_1203/round*.json.gz: every request's
sending, seconds and outcome, the kill / restart / ready / re-admission times, the primaries' step traces). Per
round, two things are fitted on the round itself, as tests/simulator/test_against_engine.py fits its step costs:
- the step cadence (a step's trace time to the next one's, while the replica is busy) as a + b x tokens + c x
  sequences, over the three primaries' steps of the round;
- the per-request latency the steps do not see (router, HTTP, tokenizing): the measured median of the
  non-streamed requests sent before the kill, less the simulated one without it.
Inputs taken from the round: the restart's start-up time (ready - restart) and the suite's scenario. Predicted
and compared: the suite's figures (sent, succeeded, retried, failed cleanly, seconds), and per phase the requests
sent, the requests per second and the median / p99 seconds of non-streamed and streamed requests.

The box's two cores are shared (host_share.py, HOST: the three primaries, the router's two workers and the client):
the cadence is fitted on each step's gap over the sharing factor at its time (the round's events: a replica dead
from the kill, the restarting process busy until /ready, the restarted one idle until its re-admission), so it is
the all-alive cadence, and the simulation scales each step by the factor at its start. `host=None` replays without
it (the tables before 2026-12-04).

    python -m meshserve.simulator.validation_faults [ROUND.json[.gz] ...]
"""

from __future__ import annotations

import gzip
import itertools
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from meshserve.engine.step_time import StepShape
from meshserve.simulator.config import SimConfig
from meshserve.simulator.faults import ClosedLoopLoad, FaultRun, KillRestart, RouterHealth, run_kill_restart
from meshserve.simulator.host_share import SharedHost, fault_suite_host

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results" / "router_faults_cpu_1203"
PHASES = ("start", "dead", "restarting", "readmitted")
BUSY_GAP_S = 0.05  # a longer gap between two steps' trace times is an idle replica, not a step
HOST = fault_suite_host()  # the suite's box: 2 cores, 3 primaries, 2 router workers, the client
NUM_PRIMARIES = 3


def fit_cadence(steps: dict[str, list[dict]], scale: Callable[[float], float] | None = None
                ) -> tuple[tuple[float, float, float], float]:
    """(a, b, c) of a step's cadence a + b x tokens + c x sequences, least squares over every primary's busy
    steps (each gap divided by scale(its start) when given: the host's sharing factor then), and the mean
    |error| / measured it leaves."""
    x, y = [], []
    for rows in steps.values():
        for prev, row in itertools.pairwise(rows):
            gap = row["t"] - prev["t"]
            if 0 < gap < BUSY_GAP_S:
                x.append((1.0, row["tokens"], row["seqs"]))
                y.append(gap / scale(prev["t"]) if scale is not None else gap)
    xa, ya = np.array(x), np.array(y)
    theta, *_ = np.linalg.lstsq(xa, ya, rcond=None)
    return tuple(float(v) for v in theta), float(np.mean(np.abs(xa @ theta - ya) / ya))


def measured_slowdown(events: dict, host: SharedHost, num_replicas: int = NUM_PRIMARIES) -> Callable[[float], float]:
    """The host's factor over the all-alive one at time t of a measured round, from its events: every primary busy
    before the kill and after the re-admission, one fewer from the kill (dead, then restarted but idle until
    re-admitted), the restarting process busy from the restart to /ready."""
    kill, restart = events["kill_s"], events["restart_s"]
    ready, readmit = events["ready_s"], events.get("readmitted_s", math.inf)

    def at(t: float) -> float:
        if t < kill or t >= readmit:
            return host.slowdown(num_replicas, 0, num_replicas)
        return host.slowdown(num_replicas - 1, int(restart <= t < ready), num_replicas)

    return at


def phase_slowdowns(rounds: list[dict], phases: tuple[str, ...] = ("dead", "restarting", "ready", "readmitted")
                    ) -> dict[str, float]:
    """The peers' (the primaries not killed) step time per phase over the pre-kill phase's, pooled over the
    rounds: the time of their busy steps over what the round's cadence (fitted unscaled) gives them, relative to
    the same before the kill. Processor sharing predicts (busy - 1) / busy with a replica dead (busy: the
    processes busy with all alive) and 1 while the restart is busy."""
    sums: dict[str, list[float]] = {p: [0.0, 0.0] for p in ("start", *phases)}
    for measured in rounds:
        ev = measured["events"]
        (a, b, c), _ = fit_cadence(measured["steps"])
        victim = f"primary-{measured['scenario']['victim']}"
        for name, rows in measured["steps"].items():
            if name == victim:
                continue
            for prev, row in itertools.pairwise(rows):
                gap = row["t"] - prev["t"]
                if not 0 < gap < BUSY_GAP_S:
                    continue
                t = prev["t"]
                phase = ("start" if t < ev["kill_s"] else "dead" if t < ev["restart_s"] else "restarting"
                         if t < ev["ready_s"] else "ready" if t < ev["readmitted_s"] else "readmitted")
                if phase in sums:
                    sums[phase][0] += gap
                    sums[phase][1] += a + b * row["tokens"] + c * row["seqs"]
    base = sums["start"][0] / sums["start"][1]
    return {p: sums[p][0] / sums[p][1] / base for p in phases}


def phase_table(requests: list[dict], phases: tuple[str, ...] = PHASES) -> dict[str, dict]:
    """Per phase: requests sent, sending rate, and seconds (p50 / p99) of the non-streamed and streamed ones that
    succeeded."""
    out = {}
    for phase in phases:
        rs = [r for r in requests if r["phase"] == phase]
        sent = [r["sent_s"] for r in rs]
        span = max(sent) - min(sent) if len(sent) > 1 else 0.0
        row = {"sent": len(rs), "req_per_s": (len(rs) - 1) / span if span else 0.0}
        for kind, stream in (("plain", False), ("stream", True)):
            secs = [r["seconds"] for r in rs if r["stream"] == stream and r["outcome"] == "ok"]
            row[f"{kind}_p50"] = float(np.percentile(secs, 50)) if secs else float("nan")
            row[f"{kind}_p99"] = float(np.percentile(secs, 99)) if secs else float("nan")
        out[phase] = row
    return out


def _as_rows(run: FaultRun) -> list[dict]:
    return [{"phase": r.phase, "sent_s": r.sent_s, "seconds": r.seconds, "stream": r.stream, "outcome": r.outcome,
             "status": r.status} for r in run.requests]


def _config() -> SimConfig:
    """The suite's primaries (--max-num-seqs 8 --max-queue-len 8); the model's size does not matter (custom step
    cost), the KV pool is ample."""
    return SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=3, max_num_seqs=8, max_queue_len=8,
                     max_model_len=256, num_blocks=4096, max_num_batched_tokens=2048)


def _cadence(steps: dict[str, list[dict]], scale: Callable[[float], float] | None = None):
    (a, b, c), err = fit_cadence(steps, scale)

    def cadence(shape: StepShape) -> float:
        return a + b * shape.num_tokens + c * shape.num_seqs

    return cadence, (a, b, c), err


def _health(flags: list[str]) -> RouterHealth:
    def flag(name: str) -> str:
        return flags[flags.index(name) + 1]

    return RouterHealth(health_interval_s=float(flag("--health-interval")),
                        recover_threshold=int(flag("--recover-threshold")), max_attempts=int(flag("--max-attempts")),
                        health_timeout_s=float(flag("--health-timeout")), fail_threshold=int(flag("--fail-threshold")),
                        read_timeout_s=float(flag("--read-timeout")))


def simulate_round(measured: dict, latency_s: float | None = None, host: SharedHost | None = HOST
                   ) -> tuple[FaultRun, dict]:
    """The round's scenario simulated with its fitted cadence (and latency: fitted when None), on the shared
    host (None: the cadence fitted and run unscaled); returns the run and the fit."""
    sc = measured["scenario"]
    ev = measured["events"]
    cadence, abc, err = _cadence(measured["steps"], measured_slowdown(ev, host) if host is not None else None)
    config = _config()
    load = ClosedLoopLoad(concurrency=sc["concurrency"], stream_every=sc["stream_every"], output_len=sc["max_tokens"],
                          stream_output_len=sc["stream_max_tokens"])
    scenario = KillRestart(victim=sc["victim"], kill_after_sent=sc["total"] // 4, restart_after_sent=sc["total"] // 2,
                           start_s=ev["ready_s"] - ev["restart_s"], stop_after_sent=sc["total"],
                           stop_after_served=sc["after"])
    health = _health(sc["router_flags"])
    if latency_s is None:
        bare = run_kill_restart(config, cadence, load, scenario, health, 0.0, host=host)
        simulated = phase_table(_as_rows(bare))["start"]["plain_p50"]
        latency_s = max(0.0, phase_table(measured["requests"])["start"]["plain_p50"] - simulated)
    run = run_kill_restart(config, cadence, load, scenario, health, latency_s, host=host)
    return run, {"cadence_s": abc, "cadence_error": err, "latency_s": latency_s, "start_s": scenario.start_s}


def compare(measured: dict, host: SharedHost | None = HOST) -> dict:
    """Predicted vs measured for one round: figures and the phase table, each (simulated, measured)."""
    run, fit = simulate_round(measured, host=host)
    sim_fig, real_fig = run.figures(), measured["figures"]
    figures = {k: (sim_fig[k], real_fig[k]) for k in ("sent", "succeeded", "retried", "failed_cleanly", "seconds")}
    sim_phases, real_phases = phase_table(_as_rows(run)), phase_table(measured["requests"])
    phases = {p: {k: (sim_phases[p][k], real_phases[p][k]) for k in real_phases[p]} for p in PHASES}
    events = {k: (run.events.get(k), measured["events"].get(k)) for k in ("kill_s", "restart_s", "readmitted_s")}
    return {"fit": fit, "figures": figures, "events": events, "phases": phases}


def _print(name: str, result: dict) -> None:
    fit = result["fit"]
    a, b, c = fit["cadence_s"]
    print(f"## {name}: cadence {a * 1e3:.2f} ms + {b * 1e3:.3f} ms/token + {c * 1e3:.3f} ms/seq "
          f"(mean error {fit['cadence_error']:.0%}), latency {fit['latency_s'] * 1e3:.1f} ms, start-up "
          f"{fit['start_s']:.2f} s")
    print("| figure | simulated | measured |\n|---|---|---|")
    for k, (s, m) in result["figures"].items():
        print(f"| {k} | {s} | {m} |")
    for k, (s, m) in result["events"].items():
        print(f"| {k} | {s:.2f} | {m:.2f} |")
    print("| phase | sent | req/s | plain p50 / p99 s | stream p50 / p99 s |\n|---|---|---|---|---|")
    for p, row in result["phases"].items():
        def pair(k: str, fmt: str = ".3f", row: dict = row) -> str:
            s, m = row[k]
            return f"{s:{fmt}} / {m:{fmt}}"
        print(f"| {p} | {pair('sent', 'd')} | {pair('req_per_s', '.1f')} | {pair('plain_p50')}, {pair('plain_p99')} "
              f"| {pair('stream_p50')}, {pair('stream_p99')} |")


def load_round(path: str | Path) -> dict:
    path = Path(path)
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt") as f:
        return json.load(f)


def main(argv: list[str]) -> None:
    """The rounds on the shared host (HOST); `--no-host` replays them without it."""
    host = None if "--no-host" in argv else HOST
    paths = [Path(p) for p in argv if p != "--no-host"] or sorted(RESULTS.glob("round*.json.gz"))
    rounds = [load_round(path) for path in paths]
    if host is not None:
        busy = host.busy(NUM_PRIMARIES)
        print(f"# shared host: {host.cores} cores, {busy} processes busy with all alive; the peers' step time over "
              f"the pre-kill phase's (pooled; predicted {host.slowdown(NUM_PRIMARIES - 1, 0, NUM_PRIMARIES):.2f} "
              f"dead, {host.slowdown(NUM_PRIMARIES - 1, 1, NUM_PRIMARIES):.2f} restarting): "
              + ", ".join(f"{p} {v:.2f}" for p, v in phase_slowdowns(rounds).items()))
    for path, measured in zip(paths, rounds, strict=True):
        _print(path.name, compare(measured, host))


if __name__ == "__main__":
    from meshserve.simulator.script_main import run_script

    run_script(lambda: main(sys.argv[1:]), "meshserve.simulator.validation_faults")
