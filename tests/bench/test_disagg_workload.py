"""`python -m meshserve.bench.disagg`: the bursty workload's draws (issue 25's by default, smaller ranges for a
CPU dry run against a tiny model) and the flags that reach both servers."""

from __future__ import annotations

import argparse
import json
import random

import pytest

from meshserve.bench import disagg


def test_default_draws_are_issue_25s_workload():
    reqs = disagg.bursty_requests(2.0, 6)
    random.seed(25)  # the documented draws: prompts, then max_tokens, then the gaps
    prompts = [[random.randint(3, 10000) for _ in range(random.randint(2048, 8192))] for _ in range(6)]
    outs = [random.randint(128, 512) for _ in range(6)]
    assert [r.prompt for r in reqs] == prompts and [r.max_tokens for r in reqs] == outs
    assert all(b.send_at > a.send_at for a, b in zip(reqs, reqs[1:]))


def test_each_qps_point_draws_its_own_prompts():
    """The instances keep their prefix caches across a setup's points: the second point must not replay the
    first's prompts (it did: all cache hits)."""
    assert disagg.point_seed(0) == 25
    first, second = (disagg.bursty_requests(2.0, 8, seed=disagg.point_seed(i), prompt_len=(16, 64)) for i in (0, 1))
    assert not {tuple(r.prompt[:16]) for r in first} & {tuple(r.prompt[:16]) for r in second}


def test_length_ranges_bound_the_draws():
    reqs = disagg.bursty_requests(1.0, 20, prompt_len=(16, 64), output_len=(4, 8))
    assert all(16 <= len(r.prompt) <= 64 and 4 <= r.max_tokens <= 8 for r in reqs)
    assert len({len(r.prompt) for r in reqs}) > 1


@pytest.mark.parametrize("text", ["16", "16,64,3", "a,b", "0,8", "64,16"])
def test_a_bad_range_is_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        disagg._len_range(text)


def test_flags_reach_the_workload_and_both_servers(monkeypatch, tmp_path):
    seen: dict = {}

    def fake_run_setup(name, ns, qps):
        seen.setdefault("ns", ns)
        seen.setdefault("setups", []).append(name)
        return []

    monkeypatch.setattr(disagg, "run_setup", fake_run_setup)
    out = tmp_path / "d.json"
    argv = ["--model", "tiny", "--second-gpu", "0", "--qps", "1", "--setups", "colocated,layerwise",
            "--prompt-len-range", "16,64", "--output-len-range", "4,8", "--max-model-len", "256",
            "--output", str(out)]
    assert disagg.main(argv) == 0
    ns = seen["ns"]
    assert (ns.prompt_len_range, ns.output_len_range, ns.max_model_len) == ((16, 64), (4, 8), 256)
    assert ns.gpu_memory_utilization == 0.42 and seen["setups"] == ["colocated", "layerwise"]
    assert ns.gpu_blocks == disagg.ONE_GPU_BLOCKS  # one GPU: a fixed pool per instance
    assert json.loads(out.read_text()) == []
    # without the flags: issue 25's ranges and length
    monkeypatch.setattr(disagg, "run_setup", lambda name, ns, qps: seen.__setitem__("d", ns) or [])
    disagg.main(["--output", str(out)])
    d = seen["d"]
    assert (d.prompt_len_range, d.output_len_range, d.max_model_len) == ((2048, 8192), (128, 512), 9000)
    assert d.gpu_blocks is None  # two GPUs: each engine sizes its own pool


def _kv_configs_of_one_gpu_setup(monkeypatch, connector: str, sm_share=None,
                                 shares: list | None = None) -> list[tuple[int, list[str]]]:
    ns = argparse.Namespace(port=8700, log_dir=".", second_gpu=0, gpu_memory_utilization=0.42,
                            max_model_len=256, model="tiny", gpu_blocks=disagg.ONE_GPU_BLOCKS, connector=connector,
                            sm_share=sm_share)
    calls = []

    def serve(model, gpu, port, extra, log, sm_percent=None):
        calls.append((gpu, extra))
        if shares is not None:
            shares.append((log.rsplit("/", 1)[-1], sm_percent))

    monkeypatch.setattr(disagg, "_serve", serve)

    def stop_before_the_load(*args, **kwargs):
        raise RuntimeError("stop here")

    monkeypatch.setattr(disagg, "_wait_ready", stop_before_the_load)
    monkeypatch.setattr(disagg, "_stop", lambda procs: None)
    with pytest.raises(RuntimeError, match="stop here"):
        disagg.run_setup("layerwise", ns, [1.0])
    return calls


def test_every_server_gets_the_model_length_and_one_gpu_moves_the_kv_over_gloo(monkeypatch):
    """On one GPU both instances get the same fixed KV pool: sized by the engine, the second to size its pool
    would count the first's memory as taken (a smaller pool, or none: the server exits)."""
    calls = _kv_configs_of_one_gpu_setup(monkeypatch, "torch")
    assert [gpu for gpu, _ in calls] == [0, 0]
    for _, extra in calls:
        assert extra[extra.index("--max-model-len") + 1] == "256"
        assert extra[extra.index("--num-gpu-blocks-override") + 1] == str(disagg.ONE_GPU_BLOCKS)
        kv = json.loads(extra[extra.index("--kv-transfer-config") + 1])
        assert kv["kv_connector_extra_config"] == {"layerwise": True, "backend": "gloo"}


def test_nixl_on_one_gpu_is_asked_for_by_name_and_keeps_no_gloo_backend(monkeypatch):
    calls = _kv_configs_of_one_gpu_setup(monkeypatch, "nixl")
    for _, extra in calls:
        kv = json.loads(extra[extra.index("--kv-transfer-config") + 1])
        assert kv["kv_connector"] == "nixl"
        assert kv["kv_connector_extra_config"] == {"layerwise": True}


def test_sm_shares_go_to_the_prefill_and_the_decode_instance(monkeypatch):
    shares: list = []
    _kv_configs_of_one_gpu_setup(monkeypatch, "ipc", sm_share=(60, 40), shares=shares)
    assert shares == [("prefill-layerwise.log", 60), ("decode-layerwise.log", 40)]


def test_the_share_is_set_in_the_server_environment(monkeypatch, tmp_path):
    seen = {}

    class Proc:
        def __init__(self, cmd, env, **kwargs):
            seen["env"] = env

    monkeypatch.setattr(disagg.subprocess, "Popen", Proc)
    monkeypatch.delenv("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", raising=False)
    disagg._serve("tiny", 0, 8701, [], str(tmp_path / "s.log"), sm_percent=35)
    assert seen["env"]["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "35"
    disagg._serve("tiny", 0, 8701, [], str(tmp_path / "s.log"))
    assert "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE" not in seen["env"]


@pytest.mark.parametrize("text", ["60", "0,50", "60,101", "a,b", "60,40,1"])
def test_a_bad_share_is_a_usage_error(text):
    with pytest.raises(argparse.ArgumentTypeError):
        disagg._sm_share(text)


def test_shares_without_an_mps_daemon_are_refused_in_one_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path))  # no control pipe there
    with pytest.raises(SystemExit) as e:
        disagg.main(["--second-gpu", "0", "--sm-share", "60,40", "--output", str(tmp_path / "d.json")])
    assert e.value.code == 2 and "needs an MPS control daemon" in capsys.readouterr().err
    (tmp_path / "control").touch()  # the daemon's pipe: accepted
    monkeypatch.setattr(disagg, "run_setup", lambda name, ns, qps: [])
    assert disagg.main(["--second-gpu", "0", "--sm-share", "60,40", "--output", str(tmp_path / "d.json")]) == 0


def test_plot_draws_each_setups_goodput_itl_and_ttft(tmp_path):
    from meshserve.bench.disagg import plot_points

    points = [{"setup": s, "qps": q, "goodput": g, "itl_p99": i, "ttft_p50": t}
              for s, q, g, i, t in (("colocated", 3.0, 2.2, 0.24, 0.33), ("colocated", 2.0, 1.8, 0.085, 0.27),
                                    ("layerwise", 2.0, 1.8, 0.017, 0.54), ("layerwise", 3.0, 2.2, 0.022, 0.75))]
    path = plot_points(points, str(tmp_path / "d.svg"))
    svg = open(path).read()
    assert path.endswith(".svg") and svg.count("<polyline") == 6  # 3 panels x 2 setups
    assert all(label in svg for label in ("colocated", "layerwise", "goodput (req/s)", "ITL p99 (ms)", "TTFT p50"))
