"""frontend_fit.py: the API process's CPU costs from a run's per-second CPU log and its bench report."""

import json
import tarfile

import pytest

from meshserve.simulator.frontend_fit import (collinearity, fit_admitted, fit_free, fit_pinned, idle_rate,
                                              load_run)

FORK = "child of python3 -c from multiprocessing.forkserver impor"
REQ, TOK, REF, IDLE = 5e-3, 60e-6, 1.5e-3, 0.01  # the costs the synthetic runs are made of (per process)


def _write_run(path, points, api=2, gap_s=5.0, stop_early_s=0.0):
    """A run directory: each point (qps, admitted, tokens, refused) loads its API processes evenly over 10 s of
    its window, the engine core (busier) beside them, idle gaps between; the log stops stop_early_s before the
    last point's end."""
    t, rows, report, cpu = 1000.0, [], [], {"core": 0.0, **{f"api{i}": 0.0 for i in range(api)}}

    def tick(rate_api, rate_core, seconds):
        nonlocal t
        for _ in range(int(seconds)):
            t += 1.0
            cpu["core"] += rate_core
            for i in range(api):
                cpu[f"api{i}"] += rate_api
            rows.append({"t_wall": t, "procs": {
                "1": {"process": "python3 meshserve.cli serve x", "cpu_s": 0.3},
                **{str(10 + k): {"process": FORK, "cpu_s": v} for k, v in enumerate(cpu.values())}}})

    tick(IDLE, 0.0, gap_s)
    for qps, admitted, tokens, refused in points:
        work = admitted * REQ + tokens * TOK + refused * REF  # all processes together
        start = t
        tick(IDLE + work / api / 10, 1.0, 10)
        report.append({"qps": qps, "completed": admitted, "output_tokens": tokens,
                       "failed_by_status": {"429 slo_unattainable": refused}, "wall_start": start, "wall_end": t})
        tick(IDLE, 0.0, gap_s)
    if stop_early_s:
        cut = report[-1]["wall_end"] - stop_early_s
        rows = [r for r in rows if r["t_wall"] <= cut]
    path.mkdir(parents=True, exist_ok=True)
    (path / "proc_cpu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (path / "w3.json").write_text(json.dumps({"points": report}))
    return path


SEPARABLE = [(100, 500, 40_000, 100), (200, 900, 120_000, 300), (300, 1000, 80_000, 1500), (400, 800, 110_000, 900)]


def test_free_fit_recovers_the_costs_a_run_is_made_of(tmp_path):
    points = load_run(_write_run(tmp_path / "run", SEPARABLE))
    assert [p.processes for p in points] == [2] * 4  # the busiest forkserver child is the core, not counted
    fit = fit_free(points)
    assert fit.per_request_s == pytest.approx(REQ, rel=1e-6)
    assert fit.per_token_s == pytest.approx(TOK, rel=1e-6)
    assert fit.per_refusal_s == pytest.approx(REF, rel=1e-6)
    assert max(map(abs, fit.residuals_s)) < 1e-6


def test_idle_rate_is_measured_between_points_and_removed(tmp_path):
    run = _write_run(tmp_path / "run", SEPARABLE[:2])
    rows = [json.loads(line) for line in (run / "proc_cpu.jsonl").read_text().splitlines()]
    report = json.loads((run / "w3.json").read_text())["points"]
    windows = [(p["wall_start"], p["wall_end"]) for p in report]
    assert idle_rate(rows, ["11", "12"], windows) == pytest.approx(2 * IDLE)
    first = load_run(run)[0]
    assert first.cpu_s == pytest.approx(500 * REQ + 40_000 * TOK + 100 * REF)


def test_a_log_that_stops_early_is_carried_on_at_its_last_rate(tmp_path):
    whole = load_run(_write_run(tmp_path / "a", SEPARABLE))
    cut = load_run(_write_run(tmp_path / "b", SEPARABLE, stop_early_s=2.0))
    assert cut[-1].cpu_s == pytest.approx(whole[-1].cpu_s)
    assert cut[0].cpu_s == pytest.approx(whole[0].cpu_s)


def test_a_tgz_reads_as_its_directory(tmp_path):
    run = _write_run(tmp_path / "run", SEPARABLE)
    with tarfile.open(tmp_path / "run.tgz", "w:gz") as tar:
        tar.add(run, arcname=".")
    assert load_run(tmp_path / "run.tgz") == load_run(run)


def test_a_fixed_output_length_makes_request_and_token_inseparable(tmp_path):
    """W3's 128 tokens per request: the request / token columns are collinear, the free fit is not the truth,
    but an admitted request's whole cost and a refusal's are, and pinning the request cost gives the token's."""
    points = load_run(_write_run(tmp_path / "run", [(q, a, 128 * a, r) for q, a, _, r in SEPARABLE]))
    corr, cond = collinearity(points)
    assert corr == pytest.approx(1.0) and cond > 1e6
    separable_corr, separable_cond = collinearity(load_run(_write_run(tmp_path / "sep", SEPARABLE)))
    assert separable_corr < 0.9 and separable_cond < 100
    whole = fit_admitted(points)
    assert whole.per_admitted_s == pytest.approx(REQ + 128 * TOK, rel=1e-6)
    assert whole.per_refusal_s == pytest.approx(REF, rel=1e-6)
    pinned = fit_pinned(points, REQ)
    assert pinned.per_token_s == pytest.approx(TOK, rel=1e-6)
    assert pinned.per_refusal_s == pytest.approx(REF, rel=1e-6)
