"""The API process's CPU costs fitted to a measured run: per admitted request, per streamed token, per 429.

Input: a `tools/w3_slo.sh` result (its directory or its .tgz): `bench serve`'s report (w3.json; every point
carries its wall_start / wall_end in time.time() seconds) and `tools/proc_cpu.py log`'s proc_cpu.jsonl (one line a second:
t_wall and, per process of the server's tree, cumulative CPU seconds of all its threads). The server's
forkserver children are the engine core (the busiest) and the API processes; each point's API CPU is the sum
of theirs over its wall window, less their idle rate (measured between points) times the window.

Model, per point: cpu = per_request x admitted + per_token x tokens + per_refusal x refusals, admitted being
the completed requests and those shed from the core's queue (both paid an intake), refusals every other 429
(the gate's before parsing and the core check's after it: the report does not tell them apart). Least squares
over the points. W3's requests all stream the same 128 tokens, so tokens / admitted is constant across points
and per_request and per_token cannot be told apart (`collinearity`); what is determined is an admitted
request's whole cost with its tokens (`fit_admitted`). `fit_pinned` splits it with per_request given
(validation_frontend.py pins it by the light-load TTFT p50).

Assumed: CPU of all an API process's threads is work of its one queue (the simulator's FrontEnd); threads that
run beside the event loop would make this an upper bound of the loop's work.
"""

from __future__ import annotations

import json
import math
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORKSERVER = "forkserver"  # what proc_cpu.py's label holds for the server's spawned processes


@dataclass(frozen=True)
class PointLoad:
    """One QPS point of a run: the API processes' CPU seconds (idle rate removed) and what they handled,
    summed over the processes."""

    qps: float
    window_s: float
    cpu_s: float
    admitted: int
    tokens: int
    refusals: int
    processes: int


@dataclass(frozen=True)
class FrontEndFit:
    """CPU seconds of one API process per request (intake), per streamed token and per refusal; residuals in
    CPU seconds per point (all processes)."""

    per_request_s: float
    per_token_s: float
    per_refusal_s: float
    residuals_s: tuple[float, ...]


def api_pids(rows: list[dict]) -> list[str]:
    """The forkserver children but the busiest (the engine core): the API processes."""
    last = rows[-1]["procs"]
    spawned = [pid for pid, p in last.items() if FORKSERVER in p["process"]]
    core = max(spawned, key=lambda pid: last[pid]["cpu_s"])
    return [pid for pid in spawned if pid != core]


def _cpu(row: dict, pids: list[str]) -> float:
    return sum(row["procs"][pid]["cpu_s"] for pid in pids if pid in row["procs"])


def _cpu_at(rows: list[dict], pids: list[str], t: float) -> float:
    """The processes' cumulative CPU at wall time t, linear between samples; past the log's last sample, its
    last interval's rate carried on (a log that stopped before the point ended)."""
    times = [r["t_wall"] for r in rows]
    k = int(np.searchsorted(times, t))
    if k == 0:
        return _cpu(rows[0], pids)
    a, b = (rows[k - 1], rows[k]) if k < len(rows) else (rows[-2], rows[-1])
    rate = (_cpu(b, pids) - _cpu(a, pids)) / (b["t_wall"] - a["t_wall"])
    return _cpu(a, pids) + rate * (t - a["t_wall"])


def idle_rate(rows: list[dict], pids: list[str], windows: list[tuple[float, float]]) -> float:
    """CPU seconds per second of the processes together over the log's intervals outside every window."""
    def outside(t: float) -> bool:
        return not any(lo <= t <= hi for lo, hi in windows)
    busy = wall = 0.0
    for a, b in zip(rows, rows[1:]):
        if outside(a["t_wall"]) and outside(b["t_wall"]):
            busy += _cpu(b, pids) - _cpu(a, pids)
            wall += b["t_wall"] - a["t_wall"]
    return busy / wall if wall > 0 else 0.0


def read_member(run: Path, name: str) -> str:
    """A file of the run: run/name, or the member of the run's .tgz whose base name is name."""
    if run.is_dir():
        return (run / name).read_text()
    with tarfile.open(run) as tar:
        member = next(m for m in tar.getmembers() if Path(m.name).name == name)
        return tar.extractfile(member).read().decode()


def load_run(run: str | Path) -> list[PointLoad]:
    """Each point of a run (a directory or .tgz holding w3.json and proc_cpu.jsonl)."""
    run = Path(run)
    rows = [json.loads(line) for line in read_member(run, "proc_cpu.jsonl").splitlines() if line.strip()]
    points = json.loads(read_member(run, "w3.json"))["points"]
    pids = api_pids(rows)
    windows = [(p["wall_start"], p["wall_end"]) for p in points]
    idle = idle_rate(rows, pids, windows)
    out = []
    for p, (lo, hi) in zip(points, windows):
        by_status = p.get("failed_by_status", {})
        shed = sum(n for k, n in by_status.items() if k.endswith("slo_shed"))
        refused = sum(n for k, n in by_status.items() if k.startswith("429") and not k.endswith("slo_shed"))
        cpu = _cpu_at(rows, pids, hi) - _cpu_at(rows, pids, lo) - idle * (hi - lo)
        out.append(PointLoad(float(p["qps"]), hi - lo, cpu, p["completed"] + shed, p["output_tokens"],
                             refused, len(pids)))
    return out


def collinearity(points: list[PointLoad]) -> tuple[float, float]:
    """(correlation of admitted and tokens across the points, condition number of the three columns scaled to
    their largest value): near 1 and large, per_request and per_token are not separable."""
    a = np.array([[p.admitted, p.tokens, p.refusals] for p in points], dtype=float)
    corr = float(np.corrcoef(a[:, 0], a[:, 1])[0, 1]) if len(points) > 1 else math.nan
    return corr, float(np.linalg.cond(a / np.abs(a).max(axis=0)))


def _lstsq(cols: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    coef = np.linalg.lstsq(cols, y, rcond=None)[0]
    return coef, y - cols @ coef


def standard_errors(cols: np.ndarray, residuals: np.ndarray) -> np.ndarray:
    """Each coefficient's standard error (the residual variance over the degrees of freedom left; nan with
    none left)."""
    dof = len(residuals) - cols.shape[1]
    if dof <= 0:
        return np.full(cols.shape[1], math.nan)
    var = float(residuals @ residuals) / dof
    return np.sqrt(var * np.diag(np.linalg.inv(cols.T @ cols)))


def fit_free(points: list[PointLoad]) -> FrontEndFit:
    """All three costs by least squares (meaningless when collinearity() says so: kept to show it)."""
    cols = np.array([[p.admitted, p.tokens, p.refusals] for p in points], dtype=float)
    (req, tok, ref), res = _lstsq(cols, np.array([p.cpu_s for p in points]))
    return FrontEndFit(float(req), float(tok), float(ref), tuple(map(float, res)))


@dataclass(frozen=True)
class AdmittedFit:
    """CPU seconds of one API process per admitted request with its streamed tokens and per refusal, their
    standard errors, and the residuals in CPU seconds per point (all processes)."""

    per_admitted_s: float
    per_refusal_s: float
    per_admitted_se_s: float
    per_refusal_se_s: float
    residuals_s: tuple[float, ...]


def fit_admitted(points: list[PointLoad]) -> AdmittedFit:
    """An admitted request's whole cost (its intake and tokens) and a refusal's: the determined part."""
    cols = np.array([[p.admitted, p.refusals] for p in points], dtype=float)
    (adm, ref), res = _lstsq(cols, np.array([p.cpu_s for p in points]))
    se_adm, se_ref = standard_errors(cols, res)
    return AdmittedFit(float(adm), float(ref), float(se_adm), float(se_ref), tuple(map(float, res)))


def fit_pinned(points: list[PointLoad], per_request_s: float) -> FrontEndFit:
    """per_token and per_refusal by least squares with per_request given."""
    cols = np.array([[p.tokens, p.refusals] for p in points], dtype=float)
    y = np.array([p.cpu_s - per_request_s * p.admitted for p in points])
    (tok, ref), res = _lstsq(cols, y)
    return FrontEndFit(per_request_s, float(tok), float(ref), tuple(map(float, res)))
