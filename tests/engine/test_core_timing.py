"""CoreTiming: the core loop's thread CPU per iteration, split into the step's parts, the intake and the rest."""

from __future__ import annotations

import json

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.core_client import ADD, SHUTDOWN, run_core_loop
from meshserve.engine.core_timing import STEP_PARTS, CoreTiming, attach_from_env
from meshserve.engine.messages import EngineCoreRequest
from meshserve.sampling import SamplingParams


def _core(tiny_model_dir) -> EngineCore:
    return EngineCore.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), block_size=4, max_model_len=128))


def test_rows_split_each_iteration_of_the_real_loop(tiny_model_dir, tmp_path):
    core = _core(tiny_model_dir)
    path = tmp_path / "timing.jsonl"
    CoreTiming(core, str(path))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    commands = [(ADD, EngineCoreRequest(f"r{i}", [5 + i, 6, 7, 8], params, 6)) for i in range(3)]
    published = []

    def next_command(timeout: float):
        if commands:
            return commands.pop(0)
        return None if core.has_unfinished_requests() else (SHUTDOWN,)

    run_core_loop(core, next_command, published.append)
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    steps = len(published) - 1  # the loop published the adds' idle outputs once, then each step's
    assert len(rows) == steps - 1  # an iteration is closed by the next step's start
    assert sum(r["adds"] for r in rows) == 0  # the adds came before the first step: no closed iteration holds them
    assert sum(len(p.outputs) for p in published) >= 18  # 3 requests x 6 tokens went out
    for r in rows:
        parts = r["step_parts_s"]
        assert set(parts) == set(STEP_PARTS)
        assert 0 < r["step_cpu_s"] <= r["iter_cpu_s"]
        assert r["intake_cpu_s"] >= 0
        # the parts are inside the step (launch holds prepare; drain holds process, which holds observe)
        assert parts["schedule"] + parts["launch"] + parts["drain"] <= r["step_cpu_s"] + 1e-6
        assert parts["prepare"] <= parts["launch"] + 1e-6 and parts["observe"] <= parts["process"] + 1e-6
        assert parts["schedule"] > 0 and parts["launch"] > 0 and parts["stats"] > 0


def test_env_var_attaches_to_a_real_core_only(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("MESHSERVE_CORE_TIMING", raising=False)
    core = _core(tiny_model_dir)
    assert attach_from_env(core) is None
    monkeypatch.setenv("MESHSERVE_CORE_TIMING", str(tmp_path / "t"))
    assert attach_from_env(object()) is None  # no executor: nothing to time
    timing = attach_from_env(core)
    assert timing is not None and timing.path.startswith(str(tmp_path / "t") + ".")
    core.shutdown()  # writes the (empty) rows
    with open(timing.path) as f:
        assert f.read() == ""


def test_core_process_writes_the_timing_and_the_loop_profile_when_asked(tiny_model_dir, tmp_path, monkeypatch):
    """MESHSERVE_CORE_TIMING and MESHSERVE_CORE_PROFILE reach the spawned core process: its rows and its loop's
    cProfile are written when it stops."""
    import pstats

    from meshserve.engine.core_process import ProcessCoreClient
    from tests.engine.core_outputs import collect_outputs, finished_ids

    monkeypatch.setenv("MESHSERVE_CORE_TIMING", str(tmp_path / "timing"))
    monkeypatch.setenv("MESHSERVE_CORE_PROFILE", str(tmp_path / "core"))
    client = ProcessCoreClient(EngineArgs(model=tiny_model_dir("llama"), block_size=4, max_model_len=128))
    pid = client.proc.pid
    params = SamplingParams(max_tokens=5, ignore_eos=True)
    for i in range(2):
        client.add_request(EngineCoreRequest(f"p{i}", [5 + i, 6, 7], params, 5))
    collect_outputs(client, lambda got: finished_ids(got) == {"p0", "p1"})
    client.shutdown()
    with open(tmp_path / f"timing.{pid}.jsonl") as f:
        assert [json.loads(line) for line in f]  # the steps of the two requests
    stats = pstats.Stats(str(tmp_path / f"core.{pid}.prof"))
    assert any(name == "run_core_loop" for _, _, name in stats.stats)
