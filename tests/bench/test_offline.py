"""bench latency / throughput arguments: the pipeline layout flags reach the engine and the report."""

from __future__ import annotations

import argparse
import json

import pytest

from meshserve.bench import offline


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    offline.add_offline_parsers(parser.add_subparsers(dest="bench_command"))
    return parser.parse_args(argv)


def test_pp_layer_partition_reaches_the_engine_and_the_layout(monkeypatch):
    ns = _parse(["throughput", "-pp", "2", "--pipeline-depth", "3", "--pp-layer-partition", "17,15",
                 "--pp-token-handoff"])
    seen = {}
    monkeypatch.setattr("meshserve.LLM", lambda **kw: seen.update(kw))
    offline._llm(ns)
    assert (seen["pipeline_parallel_size"], seen["pipeline_depth"], seen["pp_layer_partition"]) == (
        2,
        3,
        [17, 15],
    )
    assert seen["pp_token_handoff"] is True
    assert offline._layout(ns)["pp_layer_partition"] == [17, 15] and offline._layout(ns)["pp_token_handoff"]
    assert "pp_token_handoff" not in offline._layout(_parse(["throughput"]))
    assert "pp_layer_partition" not in offline._layout(_parse(["throughput", "-pp", "2"]))


def test_step_trace_reaches_the_engine(monkeypatch, tmp_path):
    # a W2 run's step trace, for the simulator's fits (meshserve/simulator/step_cost.py reads serve's format)
    seen = {}
    monkeypatch.setattr("meshserve.LLM", lambda **kw: seen.update(kw))
    offline._llm(_parse(["throughput", "--step-trace", str(tmp_path / "w2.jsonl")]))
    assert seen["step_trace"] == str(tmp_path / "w2.jsonl")
    offline._llm(_parse(["latency"]))
    assert seen["step_trace"] is None


def test_hf_overrides_reach_the_engine(monkeypatch, capsys):
    # e.g. act-order int4 dummy weights: -q gptq with a desc_act quantization_config (the sorted int4 path)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": True}
    ns = _parse(["latency", "-q", "gptq", "--hf-overrides", json.dumps({"quantization_config": qc})])
    seen = {}
    monkeypatch.setattr("meshserve.LLM", lambda **kw: seen.update(kw))
    offline._llm(ns)
    assert seen["hf_overrides"] == {"quantization_config": qc} and seen["quantization"] == "gptq"
    offline._llm(_parse(["latency"]))
    assert seen["hf_overrides"] == {}
    with pytest.raises(SystemExit):
        _parse(["latency", "--hf-overrides", "[1]"])
    assert "expected a JSON object" in capsys.readouterr().err


def test_a_bad_partition_is_a_one_line_usage_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["throughput", "--pp-layer-partition", "17;15"])
    assert "expected layers per stage like 17,15" in capsys.readouterr().err


def test_a_runner_without_decode_graphs_has_no_graph_time():
    """_decode_graph_ms answers None where there is no batch-1 decode graph to replay (eager, CPU, a split
    runner), rather than timing something else."""

    class Runner:
        graphs = None

    class Engine:
        runner = Runner()

    class Llm:
        engine = Engine()

    assert offline._decode_graph_ms(Llm(), 384) is None
    Runner.graphs = type("Holder", (), {"graphs": {}})()  # built, nothing captured
    assert offline._decode_graph_ms(Llm(), 384) is None


def test_the_graph_timed_is_the_one_a_w1_step_replays(monkeypatch):
    """With a sampled graph (forward + greedy head) captured for batch 1, that one is timed (W1 replays it);
    without, the plain decode graph."""
    import torch

    from meshserve.engine import cuda_graph

    monkeypatch.setattr(cuda_graph, "replay_ms", lambda graph, replays: graph)
    holder = cuda_graph.DecodeGraphs(None, 4, 4096, 16, torch.device("cpu"))
    holder.graphs.update({(1, 4096): "plain", (2, 4096): "plain 2"})
    holder.sampled_graphs[1, 4096] = "sampled"
    llm = type("Llm", (), {"engine": type("Engine", (), {"runner": type("Runner", (), {"graphs": holder})})})
    assert offline._decode_graph_ms(llm, 384) == "sampled"
    holder.sampled_graphs.clear()
    assert offline._decode_graph_ms(llm, 384) == "plain"


def test_every_graph_a_w1_step_replays_is_timed(monkeypatch):
    """W1's steps at contexts 129..383 replay the 256-bound graph, then the 1,024 one (not the 4,096 one): each is
    timed with the static context length at its longest step (restored after), and the step mean weighs each
    by its steps; no graphs: {}."""
    import torch

    from meshserve.engine import cuda_graph

    holder = cuda_graph.DecodeGraphs(None, 4, 4096, 16, torch.device("cpu"), context_bounds=(256, 1024),
                                     splits_of=lambda bs, bound: bound)
    for bound in (256, 1024, 4096):
        holder.graphs[1, bound] = bound
    holder.sampled_graphs[1, 1024] = "sampled 1024"
    holder.seq_lens[0] = 383
    seen = []
    monkeypatch.setattr(cuda_graph, "replay_ms", lambda graph, replays: seen.append(
        (graph, int(holder.seq_lens[0]))) or (1.0 if graph == 256 else 0.5))
    llm = type("Llm", (), {"engine": type("Engine", (), {"runner": type("Runner", (), {"graphs": holder})})})
    contexts = list(range(129, 384))
    by_bound = offline._decode_graph_ms_by_bound(llm, contexts)
    assert seen == [(256, 256), ("sampled 1024", 383)] and by_bound == {256: 1.0, 1024: 0.5}
    assert int(holder.seq_lens[0]) == 383
    assert offline._steps_mean_ms(by_bound, contexts, holder.variant) == (128 * 1.0 + 127 * 0.5) / 255
    holder.graphs.clear()
    assert offline._decode_graph_ms_by_bound(llm, contexts) == {}


def test_sm_clock_samples_parse_what_nvidia_smi_prints(tmp_path, monkeypatch):
    """_sm_clock_samples reads nvidia-smi's one number per line (a fake nvidia-smi on PATH here), and yields
    an empty list where there is no nvidia-smi at all."""
    fake = tmp_path / "nvidia-smi"
    printed = tmp_path / "printed"
    fake.write_text(f"#!/bin/sh\necho \"$1\" > {tmp_path / 'id'}\nprintf '1980\\n1410\\n'\ntouch {printed}\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")  # this process's cuda:0 is the machine's GPU 3
    with offline._sm_clock_samples() as clocks:
        import time

        deadline = time.monotonic() + 30
        while not printed.exists() and time.monotonic() < deadline:  # the samples are out before it stops
            time.sleep(0.01)
    assert clocks == [1980.0, 1410.0]
    assert (tmp_path / "id").read_text().strip() == "--id=3"
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with offline._sm_clock_samples() as clocks:
        pass
    assert clocks == []


def test_sm_clock_samples_read_the_power_beside_the_clock(tmp_path, monkeypatch):
    fake = tmp_path / "nvidia-smi"
    printed = tmp_path / "printed"
    fake.write_text(f"#!/bin/sh\necho \"$2\" > {tmp_path / 'query'}\nprintf '1980, 650.50\\n1410, [N/A]\\n1755, 700\\n'\n"
                    f"touch {printed}\nexec sleep 30\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    power: list[float] = []
    with offline._sm_clock_samples(power=power) as clocks:
        import time

        deadline = time.monotonic() + 30
        while not printed.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert clocks == [1980.0, 1410.0, 1755.0] and power == [650.5, 700.0]  # an unreadable power is skipped
    assert (tmp_path / "query").read_text().strip() == "--query-gpu=clocks.sm,power.draw"


def test_w2_repeat_times_each_run_from_a_cold_prefix_cache(monkeypatch):
    import types

    import torch

    events = []

    class FakeLLM:
        def __init__(self, **kwargs):
            self.engine = types.SimpleNamespace(
                stats=lambda: {"num_preemptions": 0, "num_blocks": 10},
                config=types.SimpleNamespace(model_config=types.SimpleNamespace(hf_config=None)))

        def reset_prefix_cache(self):
            events.append("reset")
            return True

        def generate(self, prompts, params, use_tqdm=False):
            events.append(len(prompts))
            tokens = [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[1, 2])]) for _ in prompts]
            return tokens

    monkeypatch.setattr("meshserve.LLM", FakeLLM)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    res = offline.run_throughput(_parse(["throughput", "--repeat", "3", "--no-baseline"]))
    # the warm-up (4 prompts), then three timed runs of all 256 W2 prompts, each after a prefix-cache reset
    assert events == [4, "reset", 256, "reset", 256, "reset", 256]
    assert len(res["seconds_runs"]) == 3 and res["output_tokens"] == 512
    assert res["seconds"] == pytest.approx(sorted(res["seconds_runs"])[1], abs=1e-4)
    assert "seconds_runs" not in offline.run_throughput(_parse(["throughput", "--no-baseline"]))
