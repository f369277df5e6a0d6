"""Replay of the router fault suite's hung replica (faults_hang.py) and overload bursts (faults_overload.py) against
their measured rounds.

Measured by `python tools/fault_load_trace.py OUT --rounds 3 --scenario hung --scenario overload` on one cluster
(benchmarks/results/router_faults_cpu_1203/hung_round*.json.gz, overload_round*.json.gz: every request's sending,
seconds, outcome and status, the events' times, the primaries' step traces). Per round, fitted on the round itself
as validation_faults.py does for kill+restart: the step cadence (a + b x tokens + c x sequences over the primaries'
busy steps).
- hung: the per-request latency the steps do not see, from the non-streamed median before the hang. Predicted: the
  suite's figures, the ejection, the victim's requests, the phases' rates and medians.
- overload: the router -> core latency is the hung round's of the same index (measured on the same cluster
  minutes apart, at a load the CPU carries); a 503's time to the client is the round's median 503 (the router
  answers it at once: the time is the client's and the router's CPU, which the replay does not model); served
  answers reach the client `back_s` after the router is done with them, fitted to the served median (the client
  reads them late: 120 clients on two busy cores). The router runs the suite's default `--workers` on this 2-core
  machine (min(4, cores) = 2), each with its own --max-outstanding 48. Predicted: the suite's figures, the 503s
  (router) and 429s (replicas' queues), the bursts' seconds.

    python -m meshserve.simulator.validation_hang_overload [hung|overload]
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.faults import FaultRun
from meshserve.simulator.faults_hang import HungReplica, run_hung
from meshserve.simulator.faults_overload import Bursts, run_bursts
from meshserve.simulator.router_admission import RouterAdmission
from meshserve.simulator.validation_faults import (
    RESULTS,
    ClosedLoopLoad,
    _as_rows,
    _cadence,
    _config,
    _health,
    load_round,
    phase_table,
)

HUNG_PHASES = ("start", "hung", "ejected")
FIGURES = ("sent", "succeeded", "retried", "failed_cleanly", "seconds")
# the suite's router: --workers' default, min(4, cores): 2 on the 2-core machine of the 2026-12-03 rounds (later
# rounds record it)
ROUTER_WORKERS = 2


def _hung_inputs(measured: dict):
    sc = measured["scenario"]
    load = ClosedLoopLoad(concurrency=sc["concurrency"], stream_every=sc["stream_every"], output_len=sc["max_tokens"],
                          stream_output_len=sc["stream_max_tokens"])
    scenario = HungReplica(victim=sc["victim"], hang_after_sent=sc["hang_after_sent"],
                           after_ejection=sc["after_ejection"])
    return load, scenario, _health(sc["router_flags"])


def hung_latency_s(measured: dict) -> float:
    """The per-request latency of a hung round: its non-streamed median before the hang, less the simulated one."""
    load, scenario, health = _hung_inputs(measured)
    cadence, _, _ = _cadence(measured["steps"])
    bare = run_hung(_config(), cadence, load, scenario, health, 0.0)
    simulated = phase_table(_as_rows(bare), HUNG_PHASES)["start"]["plain_p50"]
    return max(0.0, phase_table(measured["requests"], HUNG_PHASES)["start"]["plain_p50"] - simulated)


def _caught(rows: list[dict]) -> int:
    """Requests the hang caught on the victim: cut (a stream with tokens out) or retried elsewhere at the read
    timeout (sent before the hang, or after it while least outstanding still chose the victim)."""
    return sum(r["attempts"] > 1 or r["outcome"] == "clean_error" for r in rows)


def compare_hung(measured: dict) -> dict:
    load, scenario, health = _hung_inputs(measured)
    cadence, abc, err = _cadence(measured["steps"])
    latency_s = hung_latency_s(measured)
    run = run_hung(_config(), cadence, load, scenario, health, latency_s)
    sim_fig, real_fig = run.figures(), measured["figures"]
    ev, real_ev = run.events, measured["events"]
    sim_rows = [{**row, "attempts": r.attempts} for row, r in zip(_as_rows(run), run.requests, strict=True)]
    events = {"hang_s": (ev["hang_s"], real_ev["hang_s"]), "ejected_s": (ev["ejected_s"], real_ev["ejected_s"]),
              "ejected_sent": (ev["ejected_sent"], real_ev["ejected_sent"]),
              "caught": (_caught(sim_rows), _caught(measured["requests"]))}
    sim_ph, real_ph = phase_table(sim_rows, HUNG_PHASES), phase_table(measured["requests"], HUNG_PHASES)
    return {"fit": {"cadence_s": abc, "cadence_error": err, "latency_s": latency_s},
            "figures": {k: (sim_fig[k], real_fig[k]) for k in FIGURES}, "events": events,
            "phases": {p: {k: (sim_ph[p][k], real_ph[p][k]) for k in real_ph[p]} for p in HUNG_PHASES}}


def _overload_table(rows: list[dict], burst_seconds: list[float]) -> dict:
    ok = [r["seconds"] for r in rows if r["outcome"] == "ok"]
    refused = [r for r in rows if r["outcome"] == "clean_error"]
    status = Counter(r["status"] for r in refused)
    return {"503": status[503], "429": status[429], "served_p50": statistics.median(ok),
            "served_p99": float(sorted(ok)[int(0.99 * (len(ok) - 1))]),
            "429_p50": statistics.median([r["seconds"] for r in refused if r["status"] == 429] or [float("nan")]),
            "burst_s": burst_seconds}


def _sim_bursts(run: FaultRun, starts: list[float]) -> list[float]:
    ends = [*starts[1:], max(r.end_s for r in run.requests)]
    return [round(e - s, 2) for s, e in zip(starts, ends, strict=True)]


def compare_overload(measured: dict, latency_s: float) -> dict:
    sc = measured["scenario"]
    cadence, abc, err = _cadence(measured["steps"])
    load = ClosedLoopLoad(concurrency=sc["concurrency"], stream_every=sc["stream_every"], output_len=sc["max_tokens"],
                          stream_output_len=sc["stream_max_tokens"])
    scenario = Bursts(bursts=sc["bursts"], limit=sc["limit"])
    flags = sc["router_flags"]
    health = _health(flags)
    max_outstanding = int(flags[flags.index("--max-outstanding") + 1])
    reqs = measured["requests"]
    refusal_s = statistics.median(r["seconds"] for r in reqs if r["status"] == 503)

    def simulate(back_s: float):
        admission = RouterAdmission(max_outstanding, sc.get("router_workers", ROUTER_WORKERS))
        return run_bursts(_config(), cadence, admission, load, scenario, health, latency_s, refusal_s,
                          back_s=back_s), admission

    bare, _ = simulate(0.0)
    served = statistics.median(r["seconds"] for r in reqs if r["outcome"] == "ok")
    back_s = max(0.0, served - statistics.median(r.seconds for r in bare.requests if r.outcome == "ok"))
    run, admission = simulate(back_s)
    starts = [r.sent_s for r in run.requests if r.index == 0 or r.phase != run.requests[r.index - 1].phase]
    sim = {**run.figures(), **_overload_table(_as_rows(run), _sim_bursts(run, starts))}
    real = {**measured["figures"], **_overload_table(reqs, [round(b["seconds"], 2) for b in measured["bursts"]])}
    keys = (*FIGURES, "503", "429", "served_p50", "served_p99", "429_p50", "burst_s")
    return {"fit": {"cadence_s": abc, "cadence_error": err, "latency_s": latency_s, "refusal_s": refusal_s,
                    "back_s": back_s, "router_refused": admission.num_refused},
            "figures": {k: (sim[k], real[k]) for k in keys}}


def _rounds(stem: str) -> list:
    return sorted(RESULTS.glob(f"{stem}*.json.gz"))


def _fit_line(name: str, fit: dict) -> str:
    a, b, c = fit["cadence_s"]
    extra = "".join(f", {k} {fit[k] * 1e3:.0f} ms" for k in ("latency_s", "refusal_s", "back_s") if k in fit)
    return (f"## {name}: cadence {a * 1e3:.2f} ms + {b * 1e3:.3f} ms/token + {c * 1e3:.3f} ms/seq "
            f"(mean error {fit['cadence_error']:.0%}){extra}")


def _pair(s, m) -> str:
    if isinstance(s, float):
        return f"{s:.3f} / {m:.3f}"
    return f"{s} / {m}"


def main(argv: list[str]) -> None:
    what = argv[0] if argv else "all"
    if len(argv) > 1 or what not in ("all", "hung", "overload"):
        raise InvalidArgumentError(f"expected one of all, hung, overload; got {' '.join(argv)!r}", param="what")
    hung = [load_round(p) for p in _rounds("hung_round")]
    if what in ("hung", "all"):
        for path, measured in zip(_rounds("hung_round"), hung, strict=True):
            result = compare_hung(measured)
            print(_fit_line(path.name, result["fit"]))
            print("| figure | simulated / measured |\n|---|---|")
            for k, (s, m) in {**result["figures"], **result["events"]}.items():
                print(f"| {k} | {_pair(s, m)} |")
            print("| phase | sent | req/s | plain p50 / p99 s | stream p50 / p99 s |\n|---|---|---|---|---|")
            for p, row in result["phases"].items():
                print(f"| {p} | {_pair(*row['sent'])} | {_pair(*row['req_per_s'])} | {_pair(*row['plain_p50'])}, "
                      f"{_pair(*row['plain_p99'])} | {_pair(*row['stream_p50'])}, {_pair(*row['stream_p99'])} |")
    if what in ("overload", "all"):
        for path, h in zip(_rounds("overload_round"), hung, strict=True):
            result = compare_overload(load_round(path), hung_latency_s(h))
            print(_fit_line(path.name, result["fit"]))
            print("| figure | simulated / measured |\n|---|---|")
            for k, (s, m) in result["figures"].items():
                print(f"| {k} | {_pair(s, m)} |")


if __name__ == "__main__":
    from meshserve.simulator.script_main import run_script

    run_script(lambda: main(sys.argv[1:]), "meshserve.simulator.validation_hang_overload")
