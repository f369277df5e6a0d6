"""The real EngineCore with its model removed and an emulated device: the device time is what the emulation
says, the host overlaps it (async scheduling), and the real server serves through it end to end."""

import json
import os
import signal
import subprocess
import sys
import time
import types

import httpx
import pytest

from meshserve import LLM, SamplingParams
from meshserve.bench import real_core
from meshserve.bench.host_overhead import remove_model
from meshserve.bench.local_server import wait_ready
from meshserve.bench.real_core import EmulatedDevice, EmulatedTimer, emulate_device
from meshserve.distributed.launch import free_port
from meshserve.engine.step_time import StepShape


def _read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_emulated_device_time_is_linear_in_the_shape():
    device = EmulatedDevice(0.001, 2e-6, 3e-8)
    assert device.time_s(StepShape(num_tokens=100, num_seqs=4, context_tokens=1000)) == pytest.approx(
        0.001 + 100 * 2e-6 + 1000 * 3e-8)


def test_emulated_timer_waits_only_for_what_is_left(monkeypatch):
    """On a clock of the test's own (no real sleeps: a loaded CI machine would blur them): the first read waits
    out what is left of the step, the second none."""
    clock, slept = [100.0], []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    monkeypatch.setattr(real_core, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=sleep))
    timer = EmulatedTimer(100.05, device_s=0.08)
    clock[0] += 0.03  # host work while the step runs
    assert timer.elapsed_s() == 0.08 and slept == [pytest.approx(0.02)]
    assert timer.elapsed_s() == 0.08 and len(slept) == 1  # done: no second wait


def _engine(device: EmulatedDevice, trace: str):
    llm = LLM(model="smollm2-135m", load_format="dummy", max_model_len=256, max_num_seqs=8,
              hf_overrides={"num_hidden_layers": 1}, device="cpu", async_scheduling=True, step_trace=trace)
    remove_model(llm.engine.runner)
    emulate_device(llm.engine.runner, device)
    return llm.engine


def test_steps_take_the_emulated_device_time_one_after_another(tmp_path):
    trace = str(tmp_path / "steps.jsonl")
    device = EmulatedDevice(0.02, 1e-5, 1e-6)
    engine = _engine(device, trace)
    engine.add_request(None, list(range(100, 140)), SamplingParams(max_tokens=10, ignore_eos=True))
    t0 = time.perf_counter()
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    wall = time.perf_counter() - t0
    engine.core.shutdown()
    assert next(o for o in outs if o.finished).outputs[0].token_ids == [17] * 10
    steps = _read_jsonl(trace)
    assert len(steps) == 10  # the prefill (which samples the first token) and 9 decodes
    for s in steps:  # the device time the step model observed is the emulation's for the step's shape
        expected = device.time_s(StepShape(s["tokens"], s["seqs"], s["context"]))
        assert s["actual_s"] == pytest.approx(expected, abs=2e-6)
    # one stream: the steps follow each other on the emulated device
    assert wall >= sum(s["actual_s"] for s in steps) - 1e-3


@pytest.mark.slow  # ~30 s on 2 busy cores: the server's processes start, serve and stop
def test_real_core_server_serves_through_the_real_scheduler(tmp_path):
    port, pid_file = free_port(), tmp_path / "pids.json"
    trace, timing = tmp_path / "steps.jsonl", tmp_path / "timing.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "meshserve.bench.frontend_server", "--port", str(port),
                             "--real-core", "smollm2-135m", "--max-num-seqs", "4", "--max-model-len", "256",
                             "--device-base-ms", "20", "--device-us-per-token", "0",
                             "--device-us-per-context-token", "0", "--step-trace", str(trace),
                             "--core-timing", str(timing), "--pid-file", str(pid_file)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, [proc], 120)
        bodies = [{"model": "fake", "prompt": [100 + i, 7, 8, 9], "max_tokens": 6, "ignore_eos": True}
                  for i in range(6)]
        with httpx.Client(timeout=60) as http:
            usages = [http.post(base + "/v1/completions", json=b).json()["usage"] for b in bodies]
        assert [u["completion_tokens"] for u in usages] == [6] * 6
        # the real core's counters: the KV blocks of the real block manager
        text = httpx.get(base + "/metrics", timeout=10).text
        assert [line.rsplit(" ", 1)[1] for line in text.splitlines()
                if line.startswith('vllm:generation_tokens_total{engine="0",')] == ["36.0"]
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    steps = _read_jsonl(trace)
    assert sum(s["tokens"] for s in steps) == 6 * 4 + 6 * 5  # the prompts, then the decodes after each first token
    assert all(s["actual_s"] == 0.02 for s in steps)
    # one emulated stream: the steps' read-backs are at least a device time apart on the whole
    assert steps[-1]["t"] - steps[0]["t"] >= 0.02 * (len(steps) - 1) - 0.002
    rows = _read_jsonl(timing)
    assert len(rows) >= len(steps) - 1 and all(r["step_cpu_s"] <= r["iter_cpu_s"] for r in rows)


def test_the_prior_can_be_a_gpus(tmp_path):
    """--prior-gpu: the step-time model starts as the whole preset's on that GPU (its data sheet), not as the
    one-layer model's at the CPU's rates (50 GB/s: ~130 ms a step for an 8B's one layer and its fp32 embedding and
    head, which a 50 ms TPOT target refuses)."""
    from meshserve.engine.step_time import StepTimeModel
    from meshserve.planner.hardware import get_gpu
    from meshserve.planner.memory import kv_bytes_per_token, weight_bytes
    from meshserve.planner.model import load_model

    engine = _engine(EmulatedDevice(0.004), str(tmp_path / "steps.jsonl"))
    core = engine.core
    shape = StepShape(num_tokens=1, num_seqs=1, context_tokens=1_000)
    try:
        cpu_prior = core.step_model.predict(shape)
        real_core.emulated_prior(core, "smollm2-135m", "H200")
        model, gpu = load_model("smollm2-135m"), get_gpu("H200")
        # the prior: 1 ms + the step's weight and KV bytes at the data sheet's bandwidth, at 80% of it
        expected = 1e-3 + (weight_bytes(model) + 1_000 * kv_bytes_per_token(model)) / gpu.hbm_bytes_per_s / 0.8
        assert isinstance(core.step_model, StepTimeModel)
        assert core.step_model.predict(shape) == pytest.approx(expected, rel=1e-6)
        assert core.scheduler.policy.step_model is core.step_model  # what SLO admission predicts with
        assert cpu_prior > 2 * expected  # the CPU's rates
    finally:
        core.shutdown()


def test_a_prior_gpu_not_in_the_catalog_is_one_line(capsys):
    from meshserve.bench import frontend_server

    with pytest.raises(SystemExit) as e:
        frontend_server.main(["--real-core", "smollm2-135m", "--prior-gpu", "H900"])
    assert e.value.code == 2 and "unknown GPU 'H900'" in capsys.readouterr().err
