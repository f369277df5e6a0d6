"""Fleets we cannot measure, simulated with their assumptions printed: Llama-3.1-70B at 1,000 req/min on H100s vs
H200s, TP=4 x DP vs TP=8, and the cheapest fleet per model and GPU kind (`python -m meshserve.simulator.validation
extrapolate`)."""

from __future__ import annotations

from meshserve.errors import InvalidArgumentError
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_H200

EXTRAPOLATION_ASSUMPTIONS = (
    "W3 lengths (512 in, 128 out), Poisson arrivals, 300 s, seed 3; the H100's own 8B step calibration on H100s, the "
    "H200's carried to the other GPUs and models at the same fraction of each GPU's data-sheet bandwidth and FLOP/s "
    "(on the H100 that was 12-13% pessimistic); TP all-reduces by the "
    "planner's ring model on the catalog's NVLink and the H200 TP=2 per-layer costs (calibration.toml's tp table: "
    "15.9 us per layer and 0.82 us per layer per sequence, x (1 - 1/tp)) carried to every GPU and TP; each "
    "replica's API process as measured on the H200 host "
    f"({FRONTEND_H200.per_request_s * 1e3:g} ms per request, {FRONTEND_H200.per_token_s * 1e6:g} us per token); "
    "catalog prices (assumed on-demand $/GPU-hour, not quotes); goodput against TTFT 1 s and TPOT 50 ms")


def fleet_row(model: str, gpu: str, num_gpus: int, tp: int, qps: float, duration_s: float = 300.0,
              seed: int = 3) -> dict:
    from meshserve.simulator.trace import poisson_trace

    config = SimConfig(model=model, gpu=gpu, num_gpus=num_gpus, tp=tp, max_model_len=4096,
                       frontend_request_s=FRONTEND_H200.per_request_s, frontend_token_s=FRONTEND_H200.per_token_s)
    r = simulate(config, poisson_trace(qps, duration_s, seed))
    return {"model": model, "gpu": r["gpu"], "num_gpus": num_gpus, "tp": tp, "replicas": num_gpus // tp,
            "ttft_p50": r["ttft_p50"], "ttft_p99": r["ttft_p99"], "tpot_p50": r["tpot_p50"], "tpot_p99": r["tpot_p99"],
            "goodput": r["goodput"], "qps": qps, "usd_per_mtok": r["cost"]["usd_per_million_output_tokens"],
            "usd_per_hour": r["cost"]["usd_per_gpu_hour"] * num_gpus}


def extrapolation_table(rows: list[dict]) -> str:
    lines = [("| model | GPUs | layout | TTFT p50 / p99 ms | TPOT p50 / p99 ms | goodput req/s (of offered) | "
              "assumed $/hour | assumed $/1M output tokens |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['num_gpus']} x {r['gpu']} | TP={r['tp']} x DP={r['replicas']} | "
                     f"{r['ttft_p50'] * 1e3:.0f} / {r['ttft_p99'] * 1e3:.0f} | {r['tpot_p50'] * 1e3:.1f} / "
                     f"{r['tpot_p99'] * 1e3:.1f} | {r['goodput']:.1f} ({r['qps']:.1f}) | {r['usd_per_hour']:.2f} | "
                     f"{r['usd_per_mtok']:.2f} |")
    return "\n".join(lines)


def extrapolations() -> str:
    """Llama-3.1-70B at 1,000 req/min on H100s vs H200s, TP=4 x DP vs TP=8; then the cost of serving each model
    at that rate on each GPU kind with the smallest fleet that meets the SLOs (goodput >= 99% of offered)."""
    rate = 1000 / 60
    out = [extrapolation_table([fleet_row("llama-3.1-70b", gpu, n, tp, rate) for gpu in ("H100-SXM", "H200")
                                for n, tp in ((4, 4), (8, 4), (8, 8))])]
    cheapest = []
    for model, layouts in (("llama-3.1-8b", ((1, 1), (2, 2), (2, 1), (4, 1))),
                           ("llama-3.1-70b", ((2, 2), (4, 4), (4, 2), (8, 4), (8, 8)))):
        for gpu in ("A100-80GB-SXM", "H100-SXM", "H200", "B200"):
            for n, tp in layouts:
                try:
                    row = fleet_row(model, gpu, n, tp, rate)
                except InvalidArgumentError:  # the model does not fit this layout on this GPU: the next one
                    continue
                if row["goodput"] >= 0.99 * rate:
                    cheapest.append(row)
                    break
    out.append(extrapolation_table(cheapest))
    out.append("Assumptions: " + EXTRAPOLATION_ASSUMPTIONS + ".")
    return "\n\n".join(out)
