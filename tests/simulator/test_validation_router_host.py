"""validation_router_host: the router-cost fit (cpu_light's, reproduced), the results folder (unpacked or the
archive), the CPU logs cut by W3 point, and the replay / summary on synthetic files."""

import json
import shutil
import subprocess
import tarfile
import tomllib
from pathlib import Path

import pytest

from meshserve.simulator import validation_router_host as vrh
from meshserve.simulator.router_node import load_router_costs

ROOT = Path(__file__).resolve().parents[2]
CPU_ROWS = ROOT / "benchmarks" / "results" / "router_cpu_1201"


def _cpu_rows() -> dict[str, dict]:
    return {n: json.loads((CPU_ROWS / f"{n}.json").read_text())[0] for n in ("c16_t128", "c16_t16", "refuse_c32",
                                                                            "c128_t128")}


def test_fit_reproduces_cpu_light():
    fit = vrh.fit_router_costs(_cpu_rows())
    stored = load_router_costs("cpu_light")
    assert fit["served_ms"] == pytest.approx(1.48, abs=0.01)
    assert fit["extra_sends_per_request"] == pytest.approx(1.1, abs=0.02)
    assert fit["per_request_ms"] == pytest.approx(stored.per_request_s * 1e3, abs=0.02)
    assert fit["per_refusal_ms"] == pytest.approx(stored.per_refusal_s * 1e3, abs=0.01)
    assert fit["per_event_us"] == pytest.approx(stored.per_event_s * 1e6, abs=1.0)
    # three rows, three unknowns: exact
    for name in vrh.FIT_ROWS:
        row = _cpu_rows()[name]
        assert vrh.row_cpu_predicted(fit, row) == pytest.approx(row["router CPU s"], rel=1e-9)


def test_fit_needs_its_rows():
    rows = _cpu_rows()
    del rows["refuse_c32"]
    with pytest.raises(ValueError, match="refuse_c32"):
        vrh.fit_router_costs(rows)


def test_least_squares_overdetermined():
    # y = 2 x0 + 3 x1 exactly, four rows
    a = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]]
    x = vrh._solve_least_squares(a, [2.0, 3.0, 5.0, 7.0])
    assert x == pytest.approx([2.0, 3.0])


def test_refusal_cheaper_than_an_intake_is_zero():
    rows = _cpu_rows()
    rows["refuse_c32"] = dict(rows["refuse_c32"], **{"router CPU s": 3.0})  # refusals far cheaper
    fit = vrh.fit_router_costs(rows)
    assert fit["refused_ms"] + fit["chunk_us"] / 1e3 < fit["served_ms"]
    assert fit["per_refusal_ms"] == 0.0


def test_toml_entry_loads():
    fit = vrh.fit_router_costs(_cpu_rows())
    env = {"cpu": "Some CPU", "cores": "16 (online 16)", "date": "2026-12-04T06:00:00Z", "router_source_sha1": "abc"}
    text = vrh.toml_entry(fit, "h200_host", env, "benchmarks/results/x")
    entry = tomllib.loads(text)["h200_host"]
    assert entry["per_request_ms"] == pytest.approx(fit["per_request_ms"], abs=0.005)
    assert entry["per_event_us"] == pytest.approx(fit["per_event_us"], abs=0.5)
    assert "Some CPU, 16 cores, 2026-12-04" in entry["source"]


def test_cpu_between_interpolates():
    log = [{"t_wall": 100.0 + i, "procs": {"1": {"process": "router", "cpu_s": 0.5 * i},
                                           "2": {"process": "child of router", "cpu_s": 0.1 * i}}} for i in range(11)]
    assert vrh.cpu_between(log, 101.5, 105.5) == pytest.approx(4 * 0.6)
    assert vrh.cpu_between(log, 101.5, 105.5, "1") == pytest.approx(4 * 0.5)
    assert vrh.cpu_between(log, 99.0, 105.0) is None  # the log starts after the window
    assert vrh.cpu_between(log[:1], 100.0, 100.5) is None


def _point(qps: float, n: int, t0: float, ttft: float, refused: int = 0) -> dict:
    return {"qps": qps, "num_requests": n, "completed": n - refused, "failed": refused, "duration_s": n / qps,
            "goodput": (n - refused) / (n / qps), "ttft_p50": ttft, "ttft_p99": 2 * ttft, "tpot_p50": 0.012,
            "itl_p50": 0.012, "output_tokens": 128 * (n - refused),
            "failed_by_status": {"429 slo_unattainable": refused} if refused else {},
            "wall_start": t0, "wall_end": t0 + n / qps}


def _cpu_log(t0: float, seconds: int, per_s: dict[str, float]) -> str:
    lines = []
    for i in range(seconds + 1):
        procs = {pid: {"process": ("child of serve" if pid == "20" else "python3 meshserve.cli"), "cpu_s": rate * i}
                 for pid, rate in per_s.items()}
        lines.append(json.dumps({"t_wall": t0 + i, "procs": procs}))
    return "\n".join(lines) + "\n"


def _write_results(folder: Path) -> None:
    rows = folder / "router_rows"
    rows.mkdir(parents=True)
    for name in ("c16_t128", "c16_t16", "refuse_c32", "c128_t128"):
        shutil.copy(CPU_ROWS / f"{name}.json", rows / f"{name}.json")
    (folder / "env.txt").write_text("date 2026-12-04T06:00:00Z\ncpu Test CPU\ncores 16 (online 16)\n"
                                    "router_source_sha1 abc123\n")
    t0 = 1_000_000.0
    for run, ttft in (("w3_router", 0.050), ("w3_direct", 0.045)):
        d = folder / run
        d.mkdir()
        points = [_point(4.0, 24, t0, ttft), _point(8.0, 24, t0 + 10, ttft, refused=2)]
        (d / "w3.json").write_text(json.dumps({"points": points}))
        (d / "proc_cpu_serve.jsonl").write_text(_cpu_log(t0 - 1, 20, {"10": 0.2, "20": 0.9}))
        if run == "w3_router":
            (d / "proc_cpu_router.jsonl").write_text(_cpu_log(t0 - 1, 20, {"30": 0.25}))


@pytest.fixture
def results_dir(tmp_path: Path) -> Path:
    _write_results(tmp_path / "r")
    return tmp_path / "r"


@pytest.mark.parametrize("packed", [False, True])
def test_results_folder_or_archive(results_dir: Path, tmp_path: Path, packed: bool):
    folder = results_dir
    if packed:
        folder = tmp_path / "packed"
        folder.mkdir()
        with tarfile.open(folder / vrh.ARCHIVE, "w:gz") as tar:
            for name in ("env.txt", "router_rows", "w3_router", "w3_direct"):
                tar.add(results_dir / name, arcname=name)
    res = vrh.Results(folder)
    assert set(res.rows()) == {"c16_t128", "c16_t16", "refuse_c32", "c128_t128"}
    assert sorted(res.w3_points("w3_router")) == [4.0, 8.0]
    assert res.env()["cpu"] == "Test CPU"
    cpu = vrh.point_cpu(res, "w3_router", res.w3_points("w3_router")[4.0])
    assert cpu["router_busy"] == pytest.approx(0.25)
    assert cpu["api_busy"] == pytest.approx(0.2)  # the API process alone, not its engine core
    assert "router_busy" not in vrh.point_cpu(res, "w3_direct", res.w3_points("w3_direct")[4.0])


def test_summary_without_replay(results_dir: Path):
    text = vrh.summary(vrh.Results(results_dir))
    assert "fit: per_request_ms 1.59, per_refusal_ms 0.32, per_event_us 102" in text
    assert "check c128_t128" in text
    assert "w3_router QPS 8: 22/24 ok (2 429)" in text
    assert "router 25% busy" in text


def test_table_replays_every_point(results_dir: Path):
    res = vrh.Results(results_dir)
    latency, how = vrh.fixed_latency(res)
    assert how == "fitted on the direct run at QPS 4" and latency > 0
    rows = vrh.replay_rows(res)
    # the router run's two points x (fitted here, the default calibration held out, cpu_light, none), the direct
    # run's two points
    assert len(rows) == 2 * 4 + 2
    from meshserve.simulator.router_node import router_calibration_name

    default = [r for r in rows if r["setting"] == f"router node, {router_calibration_name()} (default)"]
    assert len(default) == 2 and default[0]["pred"]["router_node"]["requests"] == 24
    fitted = [r for r in rows if r["setting"] == "router node, fitted here"]
    assert all(r["pred"]["router_node"]["requests"] == 24 for r in fitted)
    direct = next(r for r in rows if r["run"] == "direct" and r["qps"] == 4.0)
    assert direct["fitted"] and direct["pred"]["ttft_p50"] == pytest.approx(0.045, abs=1e-6)  # the latency included
    text = vrh.table(res)
    assert text.count("\n| through the router |") == 8 and "fixed latency fitted here" in text


def test_cli(results_dir: Path, capsys):
    assert vrh.main(["fit", str(results_dir), "--name", "h200_test"]) == 0
    entry = tomllib.loads(capsys.readouterr().out)["h200_test"]
    assert entry["per_event_us"] == 102 and str(results_dir) in entry["source"]


def test_device_script_parses():
    script = ROOT / "tools" / "router_host_device.sh"
    assert subprocess.run(["bash", "-n", str(script)], check=False).returncode == 0
    text = script.read_text()
    # on the device its environment is device_env.sh's (carried wheels), through serve_procs.sh's script_env
    assert "/serve_procs.sh\"" in text and "\nscript_env " in text
    assert '. "$(dirname "${BASH_SOURCE[0]}")/device_env.sh"' in (ROOT / "tools" / "serve_procs.sh").read_text()
    # the rows it measures are the ones the fit reads
    for name in vrh.FIT_ROWS + vrh.CHECK_ROWS:
        assert f"{name})" in text
