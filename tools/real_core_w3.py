"""W3-like load on the real serving core with its model removed (frontend_server --real-core), on the CPU.

Starts `python -m meshserve.bench.frontend_server --real-core PRESET` with W3's SLO flags, keeps --concurrency
streams of --prompt-len-token prompts and --max-tokens outputs in flight (bench frontend's lean closed-loop
client: a shed or refused request is sent again at once, as past the knee), stops the server (SIGTERM: the core
writes its --core-timing rows and, with MESHSERVE_CORE_PROFILE set, its loop's profile), then reports the core
thread's CPU per step over the steps with at least --min-running running: the step itself, the request intake
(add/abort) and the rest of the loop (ZeroMQ receive/decode, publishing the outputs).

    PYTHONPATH=$PWD python tools/real_core_w3.py --out /tmp/rc/a --concurrency 400 --duration 40
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import statistics
import subprocess
import sys
import time


def _thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of pid, by "tid name"."""
    tick = os.sysconf("SC_CLK_TCK")
    res = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
            fields = tail.split()
            res[f"{tid} {head.split('(', 1)[1]}"] = (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return res


def _read_jsonl(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def summarize(out: str, min_running: int) -> dict:
    """Medians and means over the steady iterations of the core's --core-timing rows."""
    rows = _read_jsonl(os.path.join(out, "timing.jsonl"))
    steady = [r for r in rows if r["running"] >= min_running]
    if not steady:
        return {"iterations": len(rows), "steady": 0}
    res = {"iterations": len(rows), "steady": len(steady)}
    for key in ("iter_cpu_s", "iter_wall_s", "step_cpu_s", "intake_cpu_s", "gc_cpu_s"):
        vals = [r[key] for r in steady]
        res[key.replace("_s", "_ms") + "_median"] = round(1e3 * statistics.median(vals), 3)
        res[key.replace("_s", "_ms") + "_mean"] = round(1e3 * statistics.fmean(vals), 3)
    rest = [r["iter_cpu_s"] - r["step_cpu_s"] - r["intake_cpu_s"] for r in steady]
    res["loop_rest_ms_median"] = round(1e3 * statistics.median(rest), 3)
    res["loop_rest_ms_mean"] = round(1e3 * statistics.fmean(rest), 3)
    for part in steady[0].get("step_parts_s", {}):  # a step's parts (the step's idle-outputs stats are intake's)
        vals = [r["step_parts_s"][part] for r in steady]
        res[f"step_{part}_ms_median"] = round(1e3 * statistics.median(vals), 3)
        res[f"step_{part}_ms_mean"] = round(1e3 * statistics.fmean(vals), 3)
    res["gc_full"] = sum(r["gc_full"] for r in steady)
    for key in ("adds", "running", "waiting", "outputs"):
        res[f"mean_{key}"] = round(statistics.fmean(r[key] for r in steady), 2)
    span = steady[-1]["t"] - steady[0]["t"]
    res["steady_period_ms"] = round(1e3 * span / max(1, len(steady) - 1), 3)
    steps = _read_jsonl(os.path.join(out, "steps.jsonl"))
    st = [s for s in steps if s["running"] >= min_running]
    if st:
        res["device_ms_median"] = round(1e3 * statistics.median(s["actual_s"] for s in st), 3)
        res["host_wait_ms_median"] = round(1e3 * statistics.median(s["wait_s"] for s in st), 3)
        res["never_waited_share"] = round(sum(s["wait_s"] < 1e-4 for s in st) / len(st), 3)
        res["mean_tokens"] = round(statistics.fmean(s["tokens"] for s in st), 1)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--preset", default="smollm2-135m")
    p.add_argument("--concurrency", type=int, default=400)
    p.add_argument("--client-procs", type=int, default=1)
    p.add_argument("--duration", type=float, default=40.0)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--min-running", type=int, default=200)
    p.add_argument("--server-args", default="", help="more frontend_server flags, one string")
    ns = p.parse_args(argv)
    from meshserve.bench.frontend import _client_main
    from meshserve.distributed.launch import free_port

    os.makedirs(ns.out, exist_ok=True)
    port, pid_file = free_port(), os.path.join(ns.out, "pids.json")
    cmd = [sys.executable, "-m", "meshserve.bench.frontend_server", "--port", str(port), "--real-core", ns.preset,
           "--api-server-count", str(ns.api_server_count), "--max-num-seqs", "1024", "--max-model-len", "1024",
           "--num-blocks", "14000", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "50", "--slo-prefill-chunk", "1024",
           "--step-trace", os.path.join(ns.out, "steps.jsonl"), "--core-timing", os.path.join(ns.out, "timing.jsonl"),
           "--pid-file", pid_file, *ns.server_args.split()]
    for name in ("timing.jsonl", "steps.jsonl", pid_file):
        path = name if os.path.isabs(name) else os.path.join(ns.out, name)
        if os.path.exists(path):
            os.unlink(path)
    with open(os.path.join(ns.out, "server.log"), "w") as log:
        server = subprocess.Popen(cmd, stderr=log)
    try:
        deadline = time.monotonic() + 180
        while not (os.path.exists(pid_file) and os.path.getsize(pid_file)):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start: see server.log")
            time.sleep(0.2)
        time.sleep(2.0)
        with open(pid_file) as f:
            pids = json.load(f)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        settings = argparse.Namespace(duration=ns.duration, ramp_s=2.0, max_tokens=ns.max_tokens,
                                      prompt_len=ns.prompt_len)
        per = [ns.concurrency // ns.client_procs + (i < ns.concurrency % ns.client_procs)
               for i in range(ns.client_procs)]
        start_at = time.time() + 2.0
        clients = [ctx.Process(target=_client_main, args=(port, c, start_at, settings, i, q))
                   for i, c in enumerate(per)]
        for c in clients:
            c.start()
        cpu0 = _thread_cpu_s(pids["core"])
        gathered = [q.get() for _ in clients]
        cpu1 = _thread_cpu_s(pids["core"])
        for c in clients:
            c.join()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(120)
        except subprocess.TimeoutExpired:
            server.kill()
    results = [r for rs, _ in gathered for r in rs]
    res = {"requests": len(results), "ok": sum(r[0] == 200 for r in results),
           "refused_429": sum(r[0] == 429 for r in results), "client_errors": sum(len(e) for _, e in gathered),
           "core_threads_cpu_s": {k: round(cpu1[k] - cpu0.get(k, 0.0), 2) for k in cpu1 if cpu1[k] - cpu0.get(k, 0.0)},
           **summarize(ns.out, ns.min_running)}
    with open(os.path.join(ns.out, "summary.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
