"""Replay of the router fault suite's slow kill+restart x3 (faults_cycles.py) against its measured rounds.

Measured by `python tools/fault_load_trace.py OUT --rounds 3 --scenario kill-restart-x3`
(benchmarks/results/router_faults_cpu_1203/x3_round*.json.gz: per cycle its victim, start, seconds, figures and
events; every request's sending, seconds, outcome, phase and cycle; the primaries' step traces). Fitted per round
on the round itself, as validation_faults.py fits a kill+restart round: the step cadence over the primaries' busy
steps of all three cycles, and the per-request latency from the non-streamed median of the cycles' parts before
their kills. Taken from the round: each restart's start-up (ready - restart). Predicted and compared: the suite's
figures of the round and of each cycle, each cycle's events from its start, and per cycle and phase the requests
sent, the requests per second and the medians. `--host` replays them on the shared host (host_share.py, as the
kill+restart rounds: validation_faults.HOST, the cadence fitted on the gaps over each cycle's sharing factor); off
by default (PLANNER.md's x3 table is without it).

    python -m meshserve.simulator.validation_cycles [--host] [ROUND.json[.gz] ...]
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from meshserve.simulator.faults_cycles import CyclesRun, run_kill_restart_cycles, suite_cycles
from meshserve.simulator.host_share import SharedHost
from meshserve.simulator.validation_faults import (
    HOST,
    PHASES,
    RESULTS,
    ClosedLoopLoad,
    _as_rows,
    _cadence,
    _config,
    _health,
    load_round,
    measured_slowdown,
    phase_table,
)

FIGURES = ("sent", "succeeded", "retried", "failed_cleanly", "seconds")
EVENTS = ("kill_s", "restart_s", "ready_s", "readmitted_s")


def _rows(run: CyclesRun) -> list[dict]:
    return [{**row, "cycle": run.cycle_of(r.index), "attempts": r.attempts}
            for row, r in zip(_as_rows(run), run.requests, strict=True)]


def _start_p50(rows: list[dict]) -> float:
    """The non-streamed median of every cycle's part before its kill."""
    return phase_table(rows, ("start",))["start"]["plain_p50"]


def cycles_slowdown(cycles: list[dict], host: SharedHost) -> Callable[[float], float]:
    """The host's factor at time t of a measured round: its cycle's (validation_faults.measured_slowdown)."""
    each = [measured_slowdown(cy["events"], host) for cy in cycles]

    def at(t: float) -> float:
        return each[max((c for c, cy in enumerate(cycles) if cy["start_s"] <= t), default=0)](t)

    return at


def simulate_round(measured: dict, latency_s: float | None = None, host: SharedHost | None = None
                   ) -> tuple[CyclesRun, dict]:
    """The round's three cycles simulated with its fitted cadence (and latency: fitted when None), on the shared
    host when given."""
    sc = measured["scenario"]
    cadence, abc, err = _cadence(measured["steps"], cycles_slowdown(measured["cycles"], host) if host else None)
    load = ClosedLoopLoad(concurrency=sc["concurrency"], stream_every=sc["stream_every"], output_len=sc["max_tokens"],
                          stream_output_len=sc["stream_max_tokens"])
    start_s = tuple(cy["events"]["ready_s"] - cy["events"]["restart_s"] for cy in measured["cycles"])
    assert [cy["victim"] for cy in measured["cycles"]] == list(range(len(start_s)))
    cycles = suite_cycles(start_s, sc["total"], sc["after"])
    health = _health(sc["router_flags"])
    if latency_s is None:
        bare = run_kill_restart_cycles(_config(), cadence, load, cycles, health, 0.0, host=host)
        latency_s = max(0.0, _start_p50(measured["requests"]) - _start_p50(_rows(bare)))
    run = run_kill_restart_cycles(_config(), cadence, load, cycles, health, latency_s, host=host)
    return run, {"cadence_s": abc, "cadence_error": err, "latency_s": latency_s, "start_s": start_s}


def _cycle_events(events: dict, start_s: float) -> dict:
    return {k: events[k] - start_s for k in EVENTS if k in events}


def compare(measured: dict, host: SharedHost | None = None) -> dict:
    """Predicted vs measured for one round: the figures of the round and per cycle, each cycle's events from its
    start, and per cycle the phase table, each (simulated, measured)."""
    run, fit = simulate_round(measured, host=host)
    sim_fig, real_fig = run.figures(), measured["figures"]
    sim_rows, real_rows = _rows(run), measured["requests"]
    cycles = []
    for c, (sim_cy, real_cy) in enumerate(zip(run.cycles, measured["cycles"], strict=True)):
        sf, rf = run.cycle_figures(c), real_cy["figures"]
        se = _cycle_events(sim_cy["events"], sim_cy["start_s"])
        re = _cycle_events(real_cy["events"], real_cy["start_s"])
        sp = phase_table([r for r in sim_rows if r["cycle"] == c])
        rp = phase_table([r for r in real_rows if r["cycle"] == c])
        cycles.append({"victim": real_cy["victim"], "figures": {k: (sf[k], rf[k]) for k in FIGURES},
                       "events": {k: (se.get(k), re.get(k)) for k in EVENTS},
                       "phases": {p: {k: (sp[p][k], rp[p][k]) for k in rp[p]} for p in PHASES}})
    return {"fit": fit, "figures": {k: (sim_fig[k], real_fig[k]) for k in FIGURES}, "cycles": cycles}


def _pair(s, m, fmt: str = ".3f") -> str:
    return f"{s:{fmt}} / {m:{fmt}}"


def _print(name: str, result: dict) -> None:
    fit = result["fit"]
    a, b, c = fit["cadence_s"]
    print(f"## {name}: cadence {a * 1e3:.2f} ms + {b * 1e3:.3f} ms/token + {c * 1e3:.3f} ms/seq (mean error "
          f"{fit['cadence_error']:.0%}), latency {fit['latency_s'] * 1e3:.1f} ms, start-ups "
          f"{', '.join(f'{s:.2f}' for s in fit['start_s'])} s")
    print("| cycle | " + " | ".join(FIGURES) + " | kill / restart / readmitted s from its start |")
    print("|---" * (len(FIGURES) + 2) + "|")
    for cy in result["cycles"]:
        ev = cy["events"]
        print(f"| {cy['victim']} | " + " | ".join(f"{s} / {m}" for s, m in cy["figures"].values())
              + " | " + ", ".join(_pair(*ev[k], ".2f") for k in ("kill_s", "restart_s", "readmitted_s")) + " |")
    print("| all | " + " | ".join(f"{s} / {m}" for s, m in result["figures"].values()) + " | |")
    print("| cycle | phase | sent | req/s | plain p50 / p99 s | stream p50 / p99 s |\n|---|---|---|---|---|---|")
    for cy in result["cycles"]:
        for p, row in cy["phases"].items():
            print(f"| {cy['victim']} | {p} | {_pair(*row['sent'], 'd')} | {_pair(*row['req_per_s'], '.1f')} | "
                  f"{_pair(*row['plain_p50'])}, {_pair(*row['plain_p99'])} | {_pair(*row['stream_p50'])}, "
                  f"{_pair(*row['stream_p99'])} |")


def main(argv: list[str]) -> None:
    host = HOST if "--host" in argv else None
    for path in [Path(p) for p in argv if p != "--host"] or sorted(RESULTS.glob("x3_round*.json.gz")):
        _print(path.name, compare(load_round(path), host))


if __name__ == "__main__":
    from meshserve.simulator.script_main import run_script

    run_script(lambda: main(sys.argv[1:]), "meshserve.simulator.validation_cycles")
