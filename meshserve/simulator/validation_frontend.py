"""The API process's CPU costs (frontend.py's FRONTEND_H200) refitted to a measured run, and pinned where the
run cannot separate them.

`python -m meshserve.simulator.validation_frontend` prints PLANNER.md's front-end fit. The run: the eighteenth
session (2026-12-02, one H200), `CLIENT_PROCS=8 MODEL=qwen3-0.6b bash tools/w3_slo.sh QPS --api-server-count 4
--max-num-seqs 1024 --slo-prefill-chunk 1024` with tools/proc_cpu.py's log of the server's processes, at QPS
256 / 384 / 512 (MESHSERVE_PDL=auto) and 384 (PDL off). frontend_fit.py fits an admitted request's whole cost
(intake and its 128 tokens) and a refusal's; W3's requests all stream 128 tokens, so intake and tokens are not
separable there. The intake is pinned by the fifteenth session's light-load point (Qwen3-0.6B, 4 API
processes, QPS 64, validation_qwen.py's replay): the per-request cost whose simulated TTFT p50, with no fixed
latency, equals the measured TTFT p50 less the client's measured connect p50 (time to a pooled or new
connection, which the client counts in TTFT and the simulator does not see); the per-token cost is the rest of
an admitted request's (its stream's set-up and close included).
"""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.simulator.frontend import FrontEndCosts
from meshserve.simulator.frontend_fit import (AdmittedFit, FrontEndFit, PointLoad, collinearity, fit_admitted,
                                              fit_free, fit_pinned, load_run)
from meshserve.simulator.validation import RESULTS, measured_points
from meshserve.simulator.validation_qwen import LATENCY_QPS, QWEN_RUNS, replay

CPU_RUNS = ("h200_1202_s18/w3_qwen_pdl_auto.tgz", "h200_1202_s18/w3_qwen_pdl_0.tgz")


@dataclass(frozen=True)
class Refit:
    points: list[tuple[str, PointLoad]]  # (the run's file, a point of it)
    correlation: float  # admitted vs tokens across the points
    condition: float  # of the three columns, scaled
    free: FrontEndFit  # all three by least squares (not separable: shown, not used)
    admitted: AdmittedFit
    target_ttft_s: float  # measured TTFT p50 less connect p50 at the light-load point
    pinned: FrontEndFit  # per_request pinned by target_ttft_s, per_token and per_refusal by least squares


def cpu_points(runs: tuple[str, ...] = CPU_RUNS) -> list[tuple[str, PointLoad]]:
    return [(run, p) for run in runs for p in load_run(RESULTS / run)]


def light_load_ttft(per_request_s: float, points: list[PointLoad]) -> float:
    """Simulated TTFT p50 at the light-load point (no fixed latency) with per_request_s and the rest fitted."""
    fit = fit_pinned(points, per_request_s)
    run = QWEN_RUNS[0]
    costs = FrontEndCosts(fit.per_request_s, fit.per_token_s, fit.per_refusal_s)
    return replay(LATENCY_QPS, run.max_num_seqs, frontend=costs)["ttft_p50"]


def pin_per_request(points: list[PointLoad], target_s: float, hi_s: float, tol_s: float = 1e-5) -> float:
    """The per-request cost in [0, hi_s] whose light-load TTFT p50 is target_s (bisection: TTFT grows with
    the intake; the ends when the target is outside)."""
    lo = 0.0
    if light_load_ttft(lo, points) >= target_s:
        return lo
    if light_load_ttft(hi_s, points) <= target_s:
        return hi_s
    while hi_s - lo > tol_s:
        mid = (lo + hi_s) / 2
        lo, hi_s = (mid, hi_s) if light_load_ttft(mid, points) < target_s else (lo, mid)
    return (lo + hi_s) / 2


def refit(runs: tuple[str, ...] = CPU_RUNS) -> Refit:
    labelled = cpu_points(runs)
    points = [p for _, p in labelled]
    corr, cond = collinearity(points)
    admitted = fit_admitted(points)
    light = measured_points(QWEN_RUNS[0])[LATENCY_QPS]
    target = light["ttft_p50"] - light["connect_p50"]
    per_request = pin_per_request(points, target, admitted.per_admitted_s)
    return Refit(labelled, corr, cond, fit_free(points), admitted, target, fit_pinned(points, per_request))


def report(r: Refit) -> str:
    lines = ["| run | QPS | window s | API CPU s (all processes, idle removed) | admitted | tokens | "
             "refused | CPU per process per s of the window |", "|---|---|---|---|---|---|---|---|"]
    for run, p in r.points:
        lines.append(f"| {run} | {p.qps:g} | {p.window_s:.1f} | {p.cpu_s:.1f} | {p.admitted} | {p.tokens} | "
                     f"{p.refusals} | {p.cpu_s / p.processes / p.window_s:.3f} |")
    a, f, pin = r.admitted, r.free, r.pinned
    lines += [
        "",
        f"admitted vs tokens across the points: correlation {r.correlation:.4f}, condition number "
        f"{r.condition:.0f}; all three free: {f.per_request_s * 1e3:.1f} ms per request, "
        f"{f.per_token_s * 1e6:.0f} us per token, "
        f"{f.per_refusal_s * 1e3:.2f} ms per refusal (not separable)",
        f"per admitted request with its tokens {a.per_admitted_s * 1e3:.2f} +- "
        f"{a.per_admitted_se_s * 1e3:.2f} ms, "
        f"per refusal {a.per_refusal_s * 1e3:.2f} +- {a.per_refusal_se_s * 1e3:.2f} ms; residuals "
        + ", ".join(f"{x:+.1f}" for x in a.residuals_s) + " CPU s",
        f"pinned: light-load TTFT p50 less connect p50 {r.target_ttft_s * 1e3:.2f} ms -> "
        f"{pin.per_request_s * 1e3:.2f} ms per request, {pin.per_token_s * 1e6:.1f} us per token, "
        f"{pin.per_refusal_s * 1e3:.2f} ms per refusal",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report(refit()))
