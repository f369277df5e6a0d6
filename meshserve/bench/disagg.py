"""Disaggregated vs colocated serving on two GPUs: `python -m meshserve.bench.disagg` (issue 25's measurement).

Launches, one after the other, (a) two colocated replicas (one per GPU) behind `meshserve router`, and (b) one
prefill instance (GPU 0, kv_producer) and one decode instance (GPU 1, kv_consumer) behind
`meshserve router --prefill --decode`, and (c) "layerwise": (b) with layer-wise KV transfer (each layer sent as
the prefill finishes it) and the router's --disagg-concurrent (the decode leg waits for the layers from the
start); runs the same bursty long-prompt workload through each router and
prints goodput at the TTFT and time-per-output-token targets, TTFT/ITL p50/p99, and the KV link's achieved
bandwidth (bytes and seconds the decode instance's /metrics report); for "layerwise", how much of the
sending overlapped the prefill (the prefill instance's meshserve:kv_transfer_streamed_seconds: per request, from
its first layer sent to its last, and the part of that before its prefill ended; per-request lines in the
prefill log at DEBUG).

Workload (fixed draws): random.seed(25) (the i-th QPS point: 25 + i, so no point finds the last one's prompts in
the prefix caches); n prompts of randint(2048, 8192) ids randint(3, 10000); then for each,
max_tokens randint(128, 512); then arrivals in bursts: gaps gammavariate(0.25, 4 / QPS) (mean 1/QPS, CV 2).
On one GPU (--second-gpu 0) each instance gets a fixed KV pool (--gpu-blocks, default 16,384 blocks: 32 GiB of
Llama-3.1-8B's KV, about what 0.42 of an H200 leaves it): the engine sizes its pool by what the GPU has left,
counting another process's memory as taken, so of two instances started together the second to size its pool
would see the first's (weights, or weights and pool) and get a smaller one, or none and exit.
With --sm-share P,D on one GPU under an MPS daemon (`nvidia-cuda-mps-control -d`; tools/disagg_device.sh MPS=1),
the prefill instance may use P% of the SMs and the decode instance D% (CUDA_MPS_ACTIVE_THREAD_PERCENTAGE in
each server's environment), and the two run kernels at once instead of time-slicing the GPU; the colocated
replicas get no limit (each may take the whole GPU, also at once under MPS).
--prompt-len-range LO,HI and --output-len-range LO,HI replace (2048, 8192) and (128, 512) (with --max-model-len,
default 9000), e.g. for a CPU dry run against a tiny model: `--model DIR --second-gpu 0 --num-prompts 3 --qps 1
--prompt-len-range 16,64 --output-len-range 4,8 --max-model-len 256` (the model's vocabulary must exceed 10,000).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys

import httpx

from meshserve.bench.local_server import stop as _stop
from meshserve.bench.local_server import wait_ready as _wait_ready
from meshserve.bench.serve_bench import BenchRequest, format_point, run_load, summarize


ONE_GPU_BLOCKS = 16384  # KV blocks per instance when both share one GPU (see the module docstring)
PROMPT_LEN_RANGE = (2048, 8192)
OUTPUT_LEN_RANGE = (128, 512)


def bursty_requests(
    qps: float,
    num_prompts: int,
    seed: int = 25,
    prompt_len: tuple[int, int] = PROMPT_LEN_RANGE,
    output_len: tuple[int, int] = OUTPUT_LEN_RANGE,
) -> list[BenchRequest]:
    random.seed(seed)
    prompts = [
        [random.randint(3, 10000) for _ in range(random.randint(*prompt_len))] for _ in range(num_prompts)
    ]
    outs = [random.randint(*output_len) for _ in range(num_prompts)]
    t, reqs = 0.0, []
    for p, o in zip(prompts, outs):
        t += random.gammavariate(0.25, 4.0 / qps)
        reqs.append(BenchRequest(p, o, send_at=t))
    return reqs


def _len_range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (two integers), got {text!r}") from None
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI, got {text!r}")
    return lo, hi


def _sm_share(text: str) -> tuple[int, int]:
    """--sm-share P,D: the prefill and decode instances' percentages of the SMs (1-100 each)."""
    try:
        prefill, decode = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P,D (two whole percentages), got {text!r}") from None
    if not (1 <= prefill <= 100 and 1 <= decode <= 100):
        raise argparse.ArgumentTypeError(f"each share is a percentage in 1..100, got {text!r}")
    return prefill, decode


def mps_running() -> bool:
    """Whether an MPS control daemon answers where this process's CUDA clients would look for it (the pipe
    directory of CUDA_MPS_PIPE_DIRECTORY, default /tmp/nvidia-mps)."""
    pipes = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipes, "control"))


def _serve(model: str, gpu: int, port: int, extra: list[str], log: str,
           sm_percent: int | None = None) -> subprocess.Popen:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu), PYTHONUNBUFFERED="1")
    if sm_percent is not None:  # read by the MPS client at CUDA's initialisation in that process
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(sm_percent)
    cmd = [
        sys.executable,
        "-m",
        "meshserve.cli",
        "serve",
        model,
        "--load-format",
        "dummy",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--served-model-name",
        "bench",
        "--disable-access-log",
        *extra,
    ]
    return subprocess.Popen(
        cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True
    )


def _router(port: int, args: list[str], log: str) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "meshserve.cli",
        "router",
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--read-timeout",
        "600",
        *args,
    ]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE))


def _streamed(url: str) -> tuple[float, float]:
    """The producer's layer-wise send seconds: (in all, before each request's prefill ended)."""
    name = "meshserve:kv_transfer_streamed_seconds_total"
    return _metric(url, name + '{part="total"}'), _metric(url, name + '{part="during_prefill"}')


def point_seed(index: int, seed: int = 25) -> int:
    """The draws of the index-th QPS point: its own prompts, since the instances (and their prefix caches) serve
    every point of a setup; with one seed the second point's prompts were all cache hits (H200, 2026-12-02:
    TTFT p50 85 ms at QPS 4 after QPS 2, 2.6 s when QPS 4 came first)."""
    return seed + index


def run_setup(name: str, ns: argparse.Namespace, qps_points: list[float]) -> list[dict]:
    base = ns.port
    logs = ns.log_dir
    kv = {"kv_connector": ns.connector, "kv_parallel_size": 2, "kv_ip": "127.0.0.1", "kv_port": base + 50}
    extra: dict = {"layerwise": True} if name == "layerwise" else {}
    if ns.second_gpu == 0 and ns.connector == "torch":
        extra["backend"] = "gloo"  # NCCL will not pair two processes on one GPU: gloo, staged through host memory
    if extra:
        kv["kv_connector_extra_config"] = extra
    common = ["--gpu-memory-utilization", str(ns.gpu_memory_utilization), "--max-model-len", str(ns.max_model_len)]
    if ns.gpu_blocks is not None:
        common += ["--num-gpu-blocks-override", str(ns.gpu_blocks)]
    if name == "colocated":
        servers = [
            _serve(ns.model, 0, base + 1, common, f"{logs}/colocated0.log"),
            _serve(ns.model, ns.second_gpu, base + 2, common, f"{logs}/colocated1.log"),
        ]
        router_args = [
            "--backend",
            f"http://127.0.0.1:{base + 1}",
            "--backend",
            f"http://127.0.0.1:{base + 2}",
        ]
    else:
        prod = json.dumps({**kv, "kv_role": "kv_producer", "kv_rank": 0})
        cons = json.dumps({**kv, "kv_role": "kv_consumer", "kv_rank": 1})
        prefill_sm, decode_sm = ns.sm_share or (None, None)
        servers = [
            _serve(ns.model, 0, base + 1, [*common, "--kv-transfer-config", prod], f"{logs}/prefill-{name}.log",
                   sm_percent=prefill_sm),
            _serve(
                ns.model,
                ns.second_gpu,
                base + 2,
                [*common, "--kv-transfer-config", cons],
                f"{logs}/decode-{name}.log",
                sm_percent=decode_sm,
            ),
        ]
        router_args = [
            "--prefill",
            f"http://127.0.0.1:{base + 1}",
            "--decode",
            f"http://127.0.0.1:{base + 2}",
            *(["--disagg-concurrent"] if name == "layerwise" else []),
        ]
    procs = list(servers)
    try:
        for port in (base + 1, base + 2):
            _wait_ready(f"http://127.0.0.1:{port}", procs)
        procs.append(_router(base, router_args, f"{logs}/router-{name}.log"))
        _wait_ready(f"http://127.0.0.1:{base}", procs, 60)
        points = []
        for i, qps in enumerate(qps_points):
            reqs = bursty_requests(  # (a seed per point: see point_seed)
                qps, ns.num_prompts, seed=point_seed(i), prompt_len=ns.prompt_len_range,
                output_len=ns.output_len_range
            )
            b0 = s0 = 0.0
            pre = f"http://127.0.0.1:{base + 1}"
            w0 = _streamed(pre)
            if name != "colocated":
                dec = f"http://127.0.0.1:{base + 2}"
                b0 = _metric(dec, 'meshserve:kv_transfer_bytes_total{direction="received"}')
                s0 = _metric(dec, "meshserve:kv_transfer_seconds_sum")
            results, duration = asyncio.run(
                run_load(f"http://127.0.0.1:{base}", "bench", reqs, progress=False)
            )
            s = summarize(results, duration, qps, ttft_slo=ns.ttft_slo, tpot_slo=ns.tpot_slo)
            s["setup"] = name
            s["connector"] = ns.connector
            if ns.sm_share and name != "colocated":
                s["sm_share"] = list(ns.sm_share)
            if name != "colocated":
                total, during = (b - a for a, b in zip(w0, _streamed(pre)))
                s["kv_streamed_s"], s["kv_streamed_during_prefill_s"] = total, during
                s["kv_overlap"] = during / total if total else 0.0
                nbytes = _metric(dec, 'meshserve:kv_transfer_bytes_total{direction="received"}') - b0
                secs = _metric(dec, "meshserve:kv_transfer_seconds_sum") - s0
                s["kv_bytes"], s["kv_seconds"] = nbytes, secs
                s["kv_gb_s"] = nbytes / secs / 1e9 if secs else 0.0
            print(
                f"{name}: {format_point(s)}"
                + (f", KV link {s['kv_gb_s']:.1f} GB/s" if "kv_gb_s" in s else "")
                + (
                    f", sending overlapped the prefill {100 * s['kv_overlap']:.0f}% "
                    f"({s['kv_streamed_during_prefill_s']:.2f} of {s['kv_streamed_s']:.2f} s)"
                    if s.get("kv_streamed_s")
                    else ""
                ),
                flush=True,
            )
            points.append(s)
        return points
    finally:
        _stop(procs)


def plot_points(points: list[dict], path: str) -> str:
    """Goodput, decoding requests' ITL p99 and TTFT p50 against QPS, one series per setup; returns the path
    written (.svg where matplotlib is missing: plots.write_line_plots)."""
    from meshserve.bench.plots import write_line_plots

    setups = list(dict.fromkeys(pt["setup"] for pt in points))

    def series(key: str, scale: float = 1.0) -> dict[str, tuple[list[float], list[float]]]:
        out = {}
        for setup in setups:
            pts = sorted((pt for pt in points if pt["setup"] == setup), key=lambda pt: pt["qps"])
            out[setup] = ([pt["qps"] for pt in pts], [pt[key] * scale for pt in pts])
        return out

    panels = [("goodput (req/s)", series("goodput")), ("ITL p99 (ms)", series("itl_p99", 1e3)),
              ("TTFT p50 (ms)", series("ttft_p50", 1e3))]
    return write_line_plots(path, panels, "offered load (QPS)", log_y=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--qps", default="0.5,1,2,4")
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--ttft-slo", type=float, default=2.0)
    p.add_argument("--tpot-slo", type=float, default=0.025)
    p.add_argument("--port", type=int, default=8700)
    p.add_argument(
        "--second-gpu", type=int, default=1, help="0: both instances share one GPU (when only one is lent)"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    p.add_argument(
        "--connector",
        default="torch",
        choices=["torch", "nixl", "ipc"],
        help="the KV transport (nixl: UCX picks CUDA IPC / NVLink / RDMA; ipc: one host, the decode instance "
        "maps the prefill instance's pool and copies device to device, one GPU or two)",
    )
    p.add_argument(
        "--setups",
        default="colocated,disaggregated,layerwise",
        help="comma-separated: colocated, disaggregated (whole-request transfer), layerwise",
    )
    p.add_argument(
        "--prompt-len-range", type=_len_range, default=PROMPT_LEN_RANGE, help="LO,HI prompt tokens (2048,8192)"
    )
    p.add_argument(
        "--output-len-range", type=_len_range, default=OUTPUT_LEN_RANGE, help="LO,HI max_tokens (128,512)"
    )
    p.add_argument("--max-model-len", type=int, default=9000)
    p.add_argument(
        "--gpu-blocks",
        type=int,
        default=None,
        help=f"KV blocks per instance (default: sized by the engine; {ONE_GPU_BLOCKS} with --second-gpu 0)",
    )
    p.add_argument(
        "--sm-share",
        type=_sm_share,
        default=None,
        help="P,D: under MPS on one GPU, the prefill instance's and the decode instance's percentages of the SMs",
    )
    p.add_argument("--log-dir", default=".")
    p.add_argument("--output", default="disagg_bench.json")
    p.add_argument("--plot", default="", help="goodput, ITL p99 and TTFT p50 vs QPS per setup (.png needs "
                   "matplotlib; else .svg)")
    p.add_argument("--replot", default="", metavar="JSON", help="only draw --plot from an earlier run's --output")
    ns = p.parse_args(argv)
    if ns.replot:
        if not ns.plot:
            p.error("--replot needs --plot FILE")
        with open(ns.replot) as f:
            print(f"wrote {plot_points(json.load(f), ns.plot)}")
        return 0
    if ns.sm_share is not None and not mps_running():
        p.error("--sm-share needs an MPS control daemon (nvidia-cuda-mps-control -d; tools/disagg_device.sh MPS=1): "
                "without one CUDA ignores the shares and the two processes time-slice the GPU")
    if ns.second_gpu == 0:
        ns.gpu_memory_utilization = min(ns.gpu_memory_utilization, 0.42)  # two instances on one GPU
        if ns.gpu_blocks is None:
            ns.gpu_blocks = ONE_GPU_BLOCKS
    qps = [float(x) for x in ns.qps.split(",")]
    points = []
    for setup in ns.setups.split(","):
        points += run_setup(setup, ns, qps)
    with open(ns.output, "w") as f:
        json.dump(points, f, indent=1)
    if ns.plot:
        print(f"wrote {plot_points(points, ns.plot)}")
    by = {(s["setup"], s["qps"]): s for s in points}
    for q in qps:
        c = by.get(("colocated", q))
        for d in (by.get(("disaggregated", q)), by.get(("layerwise", q))):
            if not (c and d):
                continue
            ratio = d["goodput"] / c["goodput"] if c["goodput"] else float("inf")
            print(
                f"QPS {q:g}: goodput {d['setup']} {d['goodput']:.2f} vs colocated {c['goodput']:.2f} req/s "
                f"({ratio:.2f}x); ITL p99 {d['itl_p99'] * 1e3:.1f} vs {c['itl_p99'] * 1e3:.1f} ms"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
