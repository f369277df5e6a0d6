"""W3 with SLO targets on one simulated H200: the goodput curve of the scheduling policy in this checkout.

    python tools/w3_slo_sim.py [QPS,QPS,...] [API processes per replica, default 1] [--slo-prefill-chunk N]
        [--max-num-seqs N] [--measured w3.json]

Runs meshserve/simulator's replay of W3 (exact arrivals, seed 1000 + QPS; the real Scheduler and
SchedulingPolicy on simulated time; step times from calibration.toml's h200_mixed_graphs fit of that run's
step trace; the API process as a
queue) with `--slo-ttft-ms 1000 --slo-tpot-ms 50`, beside the measured run of the same server settings
(benchmarks/results/w3_8b_slo_graphs1024.json, or --measured: a `bench serve --output-json` file of the same
settings) where it has the point. The fixed front-end latency (network, HTTP) is fitted at QPS 32 to that run's
TTFT p50, as the validation table does.
"""

from __future__ import annotations

import json

from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_H200
from meshserve.simulator.trace import w3_trace
from meshserve.simulator.validation import MeasuredRun, measured_points

MEASURED = MeasuredRun("targets, mixed graphs", "w3_8b_slo_graphs1024.json", slo=True)


def replay(qps: float, latency_s: float, api_server_count: int, prefill_chunk: int | None = None,
           max_num_seqs: int | None = None) -> dict:
    config = SimConfig(
        model="llama-3.1-8b",
        gpu="H200",
        num_gpus=1,
        max_model_len=4096,
        slo_ttft_s=1.0,
        slo_tpot_s=0.05,
        frontend_latency_s=latency_s,
        frontend_request_s=FRONTEND_H200.per_request_s,
        frontend_token_s=FRONTEND_H200.per_token_s,
        frontend_refusal_s=FRONTEND_H200.per_refusal_s,  # the API process's gate (on by default, as in the server)
        api_server_count=api_server_count,
        calibration="h200_mixed_graphs",
    )
    if prefill_chunk is not None:
        config.slo_prefill_chunk = prefill_chunk
    if max_num_seqs is not None:
        config.max_num_seqs = max_num_seqs
    return simulate(config, w3_trace(qps))


def main(qps_list: list[float], api_server_count: int = 1, prefill_chunk: int | None = None,
         max_num_seqs: int | None = None, measured_path: str | None = None) -> None:
    if measured_path is None:
        measured = measured_points(MEASURED)
    else:
        with open(measured_path) as f:
            measured = {float(p["qps"]): p for p in json.load(f)["points"]}
    # the measured run's settings: the default file's build had one API process and no per-step prompt cap
    # (slo_prefill_chunk 0); a --measured run is taken to be of this checkout's defaults
    fit = replay(32.0, 0.0, 1, 0) if measured_path is None else replay(32.0, 0.0, api_server_count)
    latency = max(0.0, measured[32.0]["ttft_p50"] - fit["ttft_p50"])
    chunk = SimConfig().slo_prefill_chunk if prefill_chunk is None else prefill_chunk
    print(
        f"fixed front-end latency {latency * 1e3:.0f} ms (fitted at QPS 32), {api_server_count} API process(es), "
        f"--slo-prefill-chunk {chunk}, --max-num-seqs {max_num_seqs or SimConfig().max_num_seqs}"
    )
    print(
        "| QPS | goodput sim (measured) | TTFT p50 ms | TPOT p50 ms | ITL p50 ms | TTFT p99 ms | refused / shed | GPU busy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for qps in qps_list:
        r = replay(qps, latency, api_server_count, prefill_chunk, max_num_seqs)
        m = measured.get(qps)
        meas = f" ({m['goodput']:.1f}, {(r['goodput'] - m['goodput']) / m['goodput']:+.0%})" if m else ""
        print(
            f"| {qps:g} | {r['goodput']:.1f}{meas} | {r['ttft_p50'] * 1e3:.0f} | {r['tpot_p50'] * 1e3:.1f} | "
            f"{r['itl_p50'] * 1e3:.1f} | {r['ttft_p99'] * 1e3:.0f} | {r['rejected']} / {r['shed']} | "
            f"{r['gpu_busy_fraction']:.0%} |",
            flush=True,
        )


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("qps", nargs="?", default="32,48,64,96,128")
    p.add_argument("api_server_count", nargs="?", type=int, default=1)
    p.add_argument(
        "--slo-prefill-chunk", type=int, default=None, help="0: no cap (the policy before issue 18's cap)"
    )
    p.add_argument("--max-num-seqs", type=int, default=None, help="the running cap (default: the engine's 256)")
    p.add_argument("--measured", default=None, help="a `bench serve --output-json` file of the same settings")
    ns = p.parse_args()
    main([float(q) for q in ns.qps.split(",")], ns.api_server_count, ns.slo_prefill_chunk, ns.max_num_seqs,
         ns.measured)
