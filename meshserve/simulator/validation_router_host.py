"""The router on the GPU host (issue 28): its CPU costs fitted from rows measured there, and W3 through it in front
of one replica replayed against the measurement.

    python -m meshserve.simulator.validation_router_host fit DIR [--name h200_host]  # router_calibration.toml's entry
    python -m meshserve.simulator.validation_router_host table DIR    # W3 predicted vs measured
    python -m meshserve.simulator.validation_router_host summary DIR  # the measurement alone (no replay)

DIR holds what tools/router_host_device.sh wrote (its router_host.tgz, unpacked or not):
  router_rows/{c16_t128,c16_t16,refuse_c32,c128_t128}.json: `meshserve bench frontend --through-router` (the router,
      one process, in front of the real API server around the fake core), the rows router_calibration.toml's
      cpu_light is fitted to, and the check row c128_t128;
  w3_router/w3.json: W3 with targets through `meshserve router --workers 1` in front of one replica (llama-3.1-8b,
      one H200), proc_cpu_router.jsonl / proc_cpu_serve.jsonl: the router's and the replica's CPU each second;
  w3_direct/w3.json: the same W3 straight to a fresh replica;
  env.txt: the CPU, its cores, the router source's hash.

The fit is cpu_light's (router_calibration.toml): least squares of the router's CPU seconds over the rows, as a x
requests served + r x requests refused + b x chunks the clients got (one per router send; a 429's body is one);
then per_event_us = b, per_request_ms = a + b x (chunks - tokens) / served of the W3-like row (c16_t128: the sends
beside one per token, the usage chunk and [DONE], less any events folded together: the simulator charges one
event per token), per_refusal_ms = r + b - a (a refused request's cost over the intake the simulator charges it
too; 0 if the refusal costs less than a served request's intake). On router_cpu_1201's rows this gives cpu_light
(1.59 ms, 0.32 ms, 102 us; stored rounded as 1.6, 0.31, 102).

The replay is validation.replay_w3_dp's (W3's exact arrivals, one API process per replica at FRONTEND_H200's costs,
no start-up-heap stalls: the build freezes it, targets TTFT 1 s / TPOT 50 ms) with one replica, the router node
(router_node.py) at the costs fitted here, at the default calibration's (router_calibration.toml's "default", fitted
on an earlier run: held out), at cpu_light's and without it, and the router's --max-outstanding
(4096). The fixed latency (network, HTTP) is fitted on the direct run's lightest point (QPS 32: measured TTFT p50
less simulated) and used for every other row; with no direct run, the tenth session's (validation.TENTH_LATENCY_OF).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tarfile
from pathlib import Path

from meshserve.router.config import RouterConfig
from meshserve.simulator.config import SimConfig
from meshserve.simulator.fleet import simulate
from meshserve.simulator.frontend import FRONTEND_H200
from meshserve.simulator.router_node import ROUTER_OFF, RouterCosts, load_router_costs, router_calibration_name
from meshserve.simulator.trace import w3_trace

FIT_ROWS = ("c16_t128", "c16_t16", "refuse_c32")  # cpu_light's rows
CHECK_ROWS = ("c128_t128",)  # measured, not fitted: the fit's prediction beside it
W3_LIKE_ROW = "c16_t128"  # 128 tokens a request: its sends beside the tokens' go into per_request_ms
ARCHIVE = "router_host.tgz"


# -- reading a results folder --------------------------------------------------------------------------------
class Results:
    """The files of a results folder: DIR/PATH, or PATH inside DIR/`archive` when its `unpacked` folder is not
    there (router_host.tgz and router_rows/ here; validation_dp_router's own)."""

    def __init__(self, folder: str | Path, archive: str = ARCHIVE, unpacked: str = "router_rows"):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise SystemExit(f"{folder}: not a folder")
        self._members: dict[str, bytes] | None = None  # the archive's files, read once (a few MB)
        archive_path = self.folder / archive
        if not (self.folder / unpacked).is_dir() and archive_path.is_file():
            with tarfile.open(archive_path) as tar:
                self._members = {m.name.removeprefix("./"): tar.extractfile(m).read()
                                 for m in tar.getmembers() if m.isfile()}

    def text(self, path: str) -> str | None:
        if self._members is None:
            p = self.folder / path
            return p.read_text() if p.is_file() else None
        data = self._members.get(path)
        return None if data is None else data.decode()

    def json(self, path: str):
        text = self.text(path)
        return None if text is None else json.loads(text)

    def jsonl(self, path: str) -> list[dict]:
        text = self.text(path)
        out = []
        for line in (text or "").splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:  # a line cut by the logger's kill
                pass
        return out

    def row(self, name: str) -> dict | None:
        data = self.json(f"router_rows/{name}.json")
        return data[0] if data else None

    def rows(self, names=FIT_ROWS + CHECK_ROWS) -> dict[str, dict]:
        return {n: r for n in names if (r := self.row(n)) is not None}

    def w3_points(self, run: str) -> dict[float, dict]:
        data = self.json(f"{run}/w3.json")
        return {float(p["qps"]): p for p in data["points"]} if data else {}

    def env(self) -> dict[str, str]:
        env = {}
        for line in (self.text("env.txt") or "").splitlines():
            key, _, value = line.partition(" ")
            env[key] = value
        return env


# -- the fit ---------------------------------------------------------------------------------------------------
def _solve_least_squares(a: list[list[float]], y: list[float]) -> list[float]:
    """x minimizing |a x - y| (normal equations, Gaussian elimination with pivoting; no numpy on the device)."""
    n = len(a[0])
    m = [[sum(r[i] * r[j] for r in a) for j in range(n)] + [sum(r[i] * v for r, v in zip(a, y))] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda k: abs(m[k][c]))
        if abs(m[p][c]) < 1e-12:
            raise ValueError("the rows do not determine the costs (singular)")
        m[c], m[p] = m[p], m[c]
        for k in range(n):
            if k != c:
                f = m[k][c] / m[c][c]
                m[k] = [u - f * v for u, v in zip(m[k], m[c])]
    return [m[i][n] / m[i][i] for i in range(n)]


def _served(row: dict) -> int:
    return row["requests"] - row["rejected"]


def fit_router_costs(rows: dict[str, dict], names: tuple[str, ...] = FIT_ROWS, w3_like: str = W3_LIKE_ROW) -> dict:
    """cpu_light's fit (the module's docstring) of `bench frontend --through-router` rows: the raw coefficients and
    the three costs the simulator's router node takes."""
    missing = [n for n in names if n not in rows]
    if missing:
        raise ValueError(f"router rows missing: {', '.join(missing)}")
    used = [rows[n] for n in names]
    a_ms, r_ms, b_us = _solve_least_squares(
        [[_served(r) / 1e3, r["rejected"] / 1e3, r["chunks"] / 1e6] for r in used], [r["router CPU s"] for r in used])
    like = rows[w3_like]
    extra = (like["chunks"] - like["tokens"]) / max(_served(like), 1)
    return {"served_ms": a_ms, "refused_ms": r_ms, "chunk_us": b_us, "extra_sends_per_request": extra,
            "per_request_ms": a_ms + extra * b_us / 1e3, "per_refusal_ms": max(0.0, r_ms + b_us / 1e3 - a_ms),
            "per_event_us": b_us, "rows": list(names)}


def costs_of(fit: dict) -> RouterCosts:
    return RouterCosts(fit["per_request_ms"] / 1e3, fit["per_event_us"] / 1e6, fit["per_refusal_ms"] / 1e3)


def row_cpu_predicted(fit: dict, row: dict) -> float:
    """The fit's router CPU seconds for a row (its raw coefficients: served, refused, chunks)."""
    return ((fit["served_ms"] * _served(row) + fit["refused_ms"] * row["rejected"]) / 1e3
            + fit["chunk_us"] * row["chunks"] / 1e6)


def toml_entry(fit: dict, name: str = "h200_host", env: dict[str, str] | None = None, where: str = "DIR") -> str:
    """A router_calibration.toml section for the fit (its comment and source filled from env.txt)."""
    env = env or {}
    cpu, cores = env.get("cpu", "the GPU host's CPU"), env.get("cores", "?").split()[0]
    date = env.get("date", "?")[:10]
    router = env.get("router_source_sha1", "?")
    rows = ",".join(fit["rows"])
    lines = [
        f"# The GPU host's CPU ({cpu}, {cores} cores), the router after a54870b (httptools relay), one process",
        "# (--workers 1): cpu_light's rows and fit (tools/router_host_device.sh; validation_router_host.py fit):",
        (f"# {fit['served_ms']:.3f} ms per request served, {fit['refused_ms']:.3f} ms per refused request "
         f"(+ its body's send), {fit['chunk_us']:.1f} us per send;"),
        (f"# {fit['extra_sends_per_request']:+.2f} sends per request beside one per token (W3-like row "
         f"{W3_LIKE_ROW}) in per_request_ms."),
        f"[{name}]",
        f'source = "{where}/router_rows/{{{rows}}}.json: {cpu}, {cores} cores, {date}, router source sha1 {router}"',
        f"per_request_ms = {fit['per_request_ms']:.2f}",
        f"per_refusal_ms = {fit['per_refusal_ms']:.2f}",
        f"per_event_us = {fit['per_event_us']:.0f}",
    ]
    return "\n".join(lines)


# -- the CPU logs ---------------------------------------------------------------------------------------------------
def cpu_between(log: list[dict], t0: float, t1: float, pid: str | None = None) -> float | None:
    """CPU seconds (every process in the log, or pid's alone) between wall times t0 and t1, read linearly between
    the log's per-second samples; None when the log does not cover the window."""
    samples = [(e["t_wall"], sum(p["cpu_s"] for k, p in e["procs"].items() if pid is None or k == pid))
               for e in log]
    if len(samples) < 2 or samples[0][0] > t0 or samples[-1][0] < t1 - 1.5:
        return None

    def at(t: float) -> float:
        for (ta, ca), (tb, cb) in itertools.pairwise(samples):
            if ta <= t <= tb:
                return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb
        return samples[-1][1]

    return at(min(t1, samples[-1][0])) - at(t0)


def _refused(point: dict) -> int:
    return sum(n for kind, n in point.get("failed_by_status", {}).items() if kind.startswith("429"))


def point_cpu(results: Results, run: str, point: dict) -> dict:
    """The router's and the replica's API process's measured CPU over one W3 point's wall window (busy: of a core)."""
    t0, t1 = point.get("wall_start"), point.get("wall_end")
    out: dict = {}
    if t0 is None or t1 is None or t1 <= t0:
        return out
    router_log = results.jsonl(f"{run}/proc_cpu_router.jsonl")
    cpu = cpu_between(router_log, t0, t1)
    if cpu is not None:
        out["router_cpu_s"], out["router_busy"] = cpu, cpu / (t1 - t0)
    serve_log = results.jsonl(f"{run}/proc_cpu_serve.jsonl")
    if serve_log:
        # the API process is the log's root: the process whose parent is not in the log (its first line's pids)
        procs = serve_log[0]["procs"]
        root = next((k for k, p in procs.items() if "child of" not in p["process"]), None)
        api = cpu_between(serve_log, t0, t1, root) if root else None
        if api is not None:
            out["api_cpu_s"], out["api_busy"] = api, api / (t1 - t0)
    return out


def w3_router_cpu_predicted(costs: RouterCosts, point: dict) -> float:
    """The router node's CPU for a W3 point as the simulator charges it: an intake per request, a refusal per 429,
    an event per output token."""
    return (costs.per_request_s * point["num_requests"] + costs.per_refusal_s * _refused(point)
            + costs.per_event_s * point["output_tokens"])


# -- the replay -------------------------------------------------------------------------------------------------
def replay(point: dict, router: RouterCosts = ROUTER_OFF, frontend_latency_s: float = 0.0) -> dict:
    """One measured W3 point replayed: its QPS and request count (W3's arrivals, seed 1000 + QPS), one replica with
    one API process, targets on, the router node at `router` (ROUTER_OFF: none) with the router's
    --max-outstanding. The fixed latency sits where validation.replay_w3_dp puts it for replays without stalls
    (validation.fixed_latency_at: between the API process and the core, inside the server's TTFT clock)."""
    from meshserve.simulator.validation import fixed_latency_at

    qps = float(point["qps"])
    config = SimConfig(model="llama-3.1-8b", gpu="H200", num_gpus=1, max_model_len=4096,
                       **fixed_latency_at(frontend_latency_s, FRONTEND_H200, True), slo_ttft_s=1.0, slo_tpot_s=0.05,
                       frontend_request_s=FRONTEND_H200.per_request_s, frontend_token_s=FRONTEND_H200.per_token_s,
                       frontend_refusal_s=FRONTEND_H200.per_refusal_s, router_request_s=router.per_request_s,
                       router_event_s=router.per_event_s, router_refusal_s=router.per_refusal_s,
                       max_outstanding=RouterConfig().max_outstanding if router.enabled else None,
                       frontend_stalls=False, seed=1000 + int(qps))
    return simulate(config, w3_trace(qps, int(point["num_requests"])))


def fixed_latency(results: Results) -> tuple[float, str]:
    """(seconds, how): the direct run's lightest point's measured TTFT p50 less simulated; else the tenth
    session's."""
    direct = results.w3_points("w3_direct")
    if direct:
        qps = 32.0 if 32.0 in direct else min(direct)
        sim = replay(direct[qps])
        return max(0.0, direct[qps]["ttft_p50"] - sim["ttft_p50"]), f"fitted on the direct run at QPS {qps:g}"
    from meshserve.simulator.validation import TENTH_LATENCY_OF, fixed_latency_of

    return fixed_latency_of(TENTH_LATENCY_OF), f"{TENTH_LATENCY_OF}'s (no direct run)"


def settings(results: Results) -> list[tuple[str, RouterCosts]]:
    """The router costs each router-run point is replayed with: fitted here (when the rows are there), the
    simulator's default calibration (fitted on an earlier run: a held-out check of it), cpu_light, none."""
    out = []
    rows = results.rows()
    if all(n in rows for n in FIT_ROWS):
        out.append(("router node, fitted here", costs_of(fit_router_costs(rows))))
    default = router_calibration_name()
    if default != "cpu_light":
        out.append((f"router node, {default} (default)", load_router_costs(default)))
    out.append(("router node, cpu_light", load_router_costs("cpu_light")))
    out.append(("no router node", ROUTER_OFF))
    return out


def replay_rows(results: Results) -> list[dict]:
    """Every measured W3 point, replayed (the router run's with each of settings(), the direct run's without a
    router node), with the measured router and API process busy fractions."""
    latency, how = fixed_latency(results)
    rows = []
    for run, label in (("w3_router", "through the router"), ("w3_direct", "direct")):
        for qps, point in sorted(results.w3_points(run).items()):
            cpu = point_cpu(results, run, point)
            for setting, costs in (settings(results) if run == "w3_router" else [("no router", ROUTER_OFF)]):
                pred = replay(point, costs, latency)
                rows.append({"run": label, "qps": qps, "setting": setting, "pred": pred, "meas": point, "cpu": cpu,
                             "latency_s": latency, "latency_how": how,
                             "fitted": run == "w3_direct" and how.endswith(f"QPS {qps:g}")})
    return rows


def _cell(pred: float, meas: float, scale: float = 1.0, fmt: str = ".1f") -> str:
    err = f" ({(pred - meas) / meas:+.0%})" if meas else ""
    return f"{pred * scale:{fmt}} / {meas * scale:{fmt}}{err}"


def metric_cells(pred: dict, meas: dict) -> str:
    """The four goal metrics' cells of a replay row, simulated / measured (error): goodput, TTFT p50 and p99, TPOT
    p50."""
    return (f"{_cell(pred['goodput'], meas['goodput'])} | {_cell(pred['ttft_p50'], meas['ttft_p50'], 1e3, '.0f')} | "
            f"{_cell(pred['ttft_p99'], meas['ttft_p99'], 1e3, '.0f')} | "
            f"{_cell(pred['tpot_p50'], meas['tpot_p50'], 1e3)}")


def table(results: Results) -> str:
    from meshserve.simulator.validation import _met

    rows = replay_rows(results)
    if not rows:
        return "no W3 points (w3_router/w3.json, w3_direct/w3.json)"
    head = ("| run (one H200 replica) | QPS | router costs | goodput req/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
            "refused | router busy | API process busy | goals met |")
    first = (f"Fixed latency {rows[0]['latency_s'] * 1e3:.0f} ms ({rows[0]['latency_how']}); "
             "cells simulated / measured.")
    lines = [first, "", head, "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, m, cpu = r["pred"], r["meas"], r["cpu"]
        node = p.get("router_node") or {}
        sim_busy = f"{node['busy_fraction']:.0%}" if node else "-"
        busy = f"{sim_busy} / {cpu['router_busy']:.0%}" if "router_busy" in cpu else f"{sim_busy} / -"
        api = f"{p['frontend']['busy_fraction']:.0%} / " + (f"{cpu['api_busy']:.0%}" if "api_busy" in cpu else "-")
        met = [k for k in ("goodput", "ttft_p50", "ttft_p99", "tpot_p50") if _met(p[k], m[k], k)]
        mark = " (fixed latency fitted here)" if r["fitted"] else ""
        lines.append(f"| {r['run']}{mark} | {r['qps']:g} | {r['setting']} | {metric_cells(p, m)} | "
                     f"{p['failed']} / {m.get('failed', 0)} | {busy} | {api} | {', '.join(met) or 'none'} |")
    return "\n".join(lines)


# -- the device's summary (no replay: the measurement and the fit) -------------------------------------------------
def summary(results: Results) -> str:
    env = results.env()
    lines = [(f"GPU host: {env.get('cpu', '?')}, {env.get('cores', '?')} cores; "
              f"router source {env.get('router_source_sha1', '?')}")]
    rows = results.rows()
    for name, r in rows.items():
        lines.append(f"row {name}: {r['requests']} requests ({r['rejected']} refused), {r['tokens']} tokens, "
                     f"{r['chunks']} chunks, router CPU {r['router CPU s']} s ({r['router cores busy']} of a core, "
                     f"{r['router CPU us/event']} us/event), TTFT p50 {r['TTFT p50 ms']} ms")
    fit = None
    try:
        fit = fit_router_costs(rows)
    except ValueError as e:
        lines.append(f"no fit: {e}")
    if fit:
        lines.append(f"fit: per_request_ms {fit['per_request_ms']:.2f}, per_refusal_ms {fit['per_refusal_ms']:.2f}, "
                     f"per_event_us {fit['per_event_us']:.0f} (raw: {fit['served_ms']:.3f} ms served, "
                     f"{fit['refused_ms']:.3f} ms refused, {fit['chunk_us']:.1f} us per send, "
                     f"{fit['extra_sends_per_request']:+.2f} sends per request beside the tokens')")
        for name in CHECK_ROWS:
            if name in rows:
                pred = row_cpu_predicted(fit, rows[name])
                lines.append(f"check {name}: router CPU {rows[name]['router CPU s']} s measured, {pred:.2f} s by the "
                             f"fit ({pred / rows[name]['router CPU s'] - 1:+.1%})")
    costs = {"fit": costs_of(fit)} if fit else {}
    costs["cpu_light"] = load_router_costs("cpu_light")
    for run in ("w3_router", "w3_direct"):
        for qps, p in sorted(results.w3_points(run).items()):
            cpu = point_cpu(results, run, p)
            line = (f"{run} QPS {qps:g}: {p['completed']}/{p['num_requests']} ok ({_refused(p)} 429), goodput "
                    f"{p['goodput']:.1f} req/s, TTFT p50 {p['ttft_p50'] * 1e3:.0f} ms "
                    f"p99 {p['ttft_p99'] * 1e3:.0f} ms, "
                    f"TPOT p50 {p['tpot_p50'] * 1e3:.1f} ms, {p['duration_s']:.1f} s")
            if "api_busy" in cpu:
                line += f"; API process {cpu['api_busy']:.0%} busy"
            if "router_cpu_s" in cpu:
                preds = ", ".join(f"{k} {w3_router_cpu_predicted(c, p):.1f} s" for k, c in costs.items())
                line += (f"; router {cpu['router_busy']:.0%} busy, CPU {cpu['router_cpu_s']:.1f} s "
                         f"(predicted: {preds})")
            lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meshserve.simulator.validation_router_host",
                                description="the router's costs on the GPU host and W3 through it, replayed")
    p.add_argument("what", choices=["fit", "table", "summary"])
    p.add_argument("dir", help="tools/router_host_device.sh's results (router_host.tgz, unpacked or not)")
    p.add_argument("--name", default="h200_host", help="fit: the router_calibration.toml section's name")
    ns = p.parse_args(argv)
    results = Results(ns.dir)
    if ns.what == "fit":
        try:
            fit = fit_router_costs(results.rows())
        except ValueError as e:
            raise SystemExit(f"{ns.dir}: {e}") from None
        print(toml_entry(fit, ns.name, results.env(), ns.dir.rstrip("/")))
    elif ns.what == "table":
        print(table(results))
    else:
        print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
