"""validation_dp_router: the replay gives the simulator the run's emulated device as its step cost, the cores'
converged predictor and the router's costs; the fixed latency is fitted on the direct run; a synthetic run made
from the simulator's own answers reads back as met, and the stored run replays."""

import json
import tarfile
from pathlib import Path

import pytest

from meshserve.bench.real_core import EmulatedDevice
from meshserve.engine.step_time import StepShape
from meshserve.simulator import validation_dp_router as vdr
from meshserve.simulator.router_node import ROUTER_OFF, load_router_costs

ROOT = Path(__file__).resolve().parents[2]
DEVICE = EmulatedDevice(4.205 * 1e-3, 19.99 * 1e-6, 0.0355 * 1e-6)  # as device_of reads env.txt
ENV = {"model": "llama-3.1-8b", "device_base_ms": "4.205", "device_us_per_token": "19.99",
       "device_us_per_context_token": "0.0355", "num_blocks": "20000"}


def _steps(device: EmulatedDevice) -> list[dict]:
    """A step trace whose times are the device's: decodes of 1-200 rows and mixed steps up to 1,024 tokens."""
    rows = []
    for seqs in (1, 8, 32, 64, 128, 200):
        for ctx in (600, 1_000):
            for extra in (0, 511, 1_023 - seqs):
                tokens = seqs + extra
                shape = StepShape(tokens, seqs, seqs * ctx + extra)
                rows.append({"tokens": tokens, "seqs": seqs, "context": shape.context_tokens,
                             "actual_s": device.time_s(shape)})
    return rows


def _point(pred: dict, qps: float, n: int, ttft_shift_s: float = 0.0) -> dict:
    """A 'measured' W3 point that is the simulator's answer (TTFT moved by ttft_shift_s)."""
    return {"qps": qps, "num_requests": n, "completed": n - pred["failed"], "goodput": pred["goodput"],
            "ttft_p50": pred["ttft_p50"] + ttft_shift_s, "ttft_p99": pred["ttft_p99"] + ttft_shift_s,
            "tpot_p50": pred["tpot_p50"], "output_tokens": 128 * n, "failed_by_status": {}}


def _folder(tmp_path: Path, direct: list[dict], routed: list[dict], env=ENV, steps=True) -> vdr.Results:
    (tmp_path / "direct").mkdir(parents=True)
    (tmp_path / "dp2_router").mkdir()
    (tmp_path / "env.txt").write_text("".join(f"{k} {v}\n" for k, v in env.items()))
    (tmp_path / "direct" / "w3.json").write_text(json.dumps({"points": direct}))
    (tmp_path / "dp2_router" / "w3.json").write_text(json.dumps({"points": routed}))
    if steps:
        for name in ("a", "b"):
            (tmp_path / "dp2_router" / f"steps_{name}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in _steps(DEVICE)))
    return vdr.open_results(tmp_path)


def test_device_and_predictor_of_the_run(tmp_path):
    results = _folder(tmp_path, [], [])
    assert vdr.device_of(results.env()) == DEVICE
    weights, err, steps = vdr.converged_weights(results, "llama-3.1-8b")
    assert steps == 2 * len(_steps(DEVICE))
    # the predictor's terms (weights or FLOPs, KV, mixed) follow a linear device roughly (the stored run: 3.3%)
    assert err < 0.08 and weights.kv_factor > 0


def test_a_run_without_its_device_or_steps_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no emulated device"):
        vdr.device_of({"model": "llama-3.1-8b"})
    results = _folder(tmp_path, [], [], steps=False)
    with pytest.raises(SystemExit, match="no step traces"):
        vdr.converged_weights(results, "llama-3.1-8b")


def test_the_replay_steps_at_the_emulated_device():
    """A light load on one replica: TPOT is about the device's one-row decode step (a 512-token prefill now and
    then lengthens a step), not the calibration's (the emulation below is ~3x slower than an H200's 8B)."""
    slow = EmulatedDevice(12e-3, 60e-6, 0.1e-6)
    from meshserve.simulator.step_cost import StepWeights

    pred = vdr.replay({"qps": 2.0, "num_requests": 30}, 1, slow, StepWeights(12.0, 0.0, 0.0, 0.0), 20_000)
    assert pred["completed"] == 30
    one_row = slow.time_s(StepShape(1, 1, 600))
    assert one_row <= pred["tpot_p50"] < 1.5 * one_row


def test_the_router_node_charges_its_costs():
    costs = load_router_costs("h200_host_1206")
    point = {"qps": 8.0, "num_requests": 40}
    from meshserve.simulator.step_cost import StepWeights

    weights = StepWeights(4.2, 0.0, 0.0, 0.0)
    pred = vdr.replay(point, 2, DEVICE, weights, 20_000, costs)
    node = pred["router_node"]
    work = 40 * costs.per_request_s + 40 * 128 * costs.per_event_s
    assert node["busy_fraction"] * pred["duration_s"] == pytest.approx(work, rel=0.05)
    assert not vdr.replay(point, 2, DEVICE, weights, 20_000, ROUTER_OFF).get("router_node")


def test_a_run_that_is_the_simulators_answer_reads_back_as_met(tmp_path):
    """Measured points made from the replay itself (the direct one 12 ms later: the fixed latency) come back
    with the latency fitted and every cell of the held-out router rows on its measurement."""
    staged = _folder(tmp_path / "stage", [], [])
    weights, _, _ = vdr.converged_weights(staged, "llama-3.1-8b")
    light = {"qps": 4.0, "num_requests": 40}
    direct = _point(vdr.replay(light, 1, DEVICE, weights, 20_000), 4.0, 40, ttft_shift_s=0.012)
    routed_pred = vdr.replay({"qps": 8.0, "num_requests": 80}, 2, DEVICE, weights, 20_000,
                             load_router_costs("default"), core_latency_s=0.012)
    results = _folder(tmp_path / "run", [direct], [_point(routed_pred, 8.0, 80)])
    rows = vdr.replay_rows(results)
    assert rows[0]["latency_s"] == pytest.approx(0.012, abs=1e-4)
    held_out = next(r for r in rows if r["setting"].endswith("(held out)"))
    for key in vdr.METRICS:
        assert held_out["pred"][key] == pytest.approx(held_out["meas"][key], rel=1e-3), key
    text = vdr.table(results)
    assert "(fixed latency fitted here)" in text and "goodput, ttft_p50, ttft_p99, tpot_p50" in text


def test_the_archive_is_read_without_unpacking(tmp_path):
    _folder(tmp_path / "src", [], [])
    (tmp_path / "packed").mkdir()
    with tarfile.open(tmp_path / "packed" / vdr.ARCHIVE, "w:gz") as tar:
        for name in ("env.txt", "direct", "dp2_router"):
            tar.add(tmp_path / "src" / name, arcname=name)
    results = vdr.open_results(tmp_path / "packed")
    assert vdr.device_of(results.env()) == DEVICE
    assert len(results.jsonl("dp2_router/steps_a.jsonl")) == len(_steps(DEVICE))


def test_the_stored_run_replays():
    """The fifty-fifth session's first run (benchmarks/results), past the knee (QPS 128, 160): the router's default
    costs meet goodput and TPOT, and predict no collapse where the router had none; the costs fitted two days
    before on this router's predecessor (h200_host) saturate the node at QPS 128: a collapse."""
    results = vdr.open_results(ROOT / "benchmarks" / "results" / vdr.STORED_RUNS[0])
    env = results.env()
    device, blocks = vdr.device_of(env), int(env["num_blocks"])
    weights, _, _ = vdr.converged_weights(results, env["model"])
    light = results.json("direct/w3.json")["points"][0]
    latency = light["ttft_p50"] - vdr.replay(light, 1, device, weights, blocks)["ttft_p50"]
    points = {p["qps"]: p for p in results.json("dp2_router/w3.json")["points"]}
    for qps in (128.0, 160.0):
        pred = vdr.replay(points[qps], 2, device, weights, blocks, load_router_costs(), latency)
        assert pred["goodput"] == pytest.approx(points[qps]["goodput"], rel=0.10)
        assert pred["tpot_p50"] == pytest.approx(points[qps]["tpot_p50"], rel=0.10)
        assert pred["router_node"]["busy_fraction"] < 0.8
    pred = vdr.replay(points[128.0], 2, device, weights, blocks, load_router_costs("h200_host"), latency)
    assert pred["goodput"] < 0.5 * points[128.0]["goodput"] and pred["router_node"]["busy_fraction"] > 0.9
