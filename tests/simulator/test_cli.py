"""`meshserve simulate`: JSON on stdout, errors as exit status 2."""

from __future__ import annotations

import json

import pytest

from meshserve.cli import main
from meshserve.errors import InvalidArgumentError


def test_simulate_prints_the_report(capsys, tmp_path):
    out = tmp_path / "sim.json"
    rc = main(["simulate", "--model", "llama-3.1-8b", "--gpu", "H100-SXM", "--num-gpus", "2", "--qps", "8",
               "--duration", "5", "--seed", "3", "--no-progress", "--output-json", str(out)])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text())
    assert report["replicas"] == 2 and report["gpu"] == "H100-SXM" and report["completed"] > 0
    assert report["cost"]["price_is_assumption"] is True
    assert report["gpu_hours"] == report["duration_s"] * 2 / 3600
    assert any("assumed" in a for a in report["assumptions"])
    for key in ("ttft_p50", "ttft_p99", "itl_p50", "tpot_p50", "goodput"):
        assert report[key] is not None


def test_trace_file_and_bursty(capsys, tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": i * 0.1, "prompt_len": 100, "output_len": 20}) + "\n"
                             for i in range(30)))
    assert main(["simulate", "--gpu", "H200", "--trace", str(trace), "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["completed"] == 30
    assert main(["simulate", "--gpu", "H200", "--arrivals", "bursty", "--qps", "5", "--duration", "10",
                 "--no-progress"]) == 0


def test_bad_layout_is_exit_2(capsys):
    assert main(["simulate", "--num-gpus", "3", "--tp", "2", "--no-progress"]) == 2
    assert "multiple of --tp" in capsys.readouterr().err


def test_pipeline_and_tp_flags_reach_the_simulation(capsys):
    """--pp-token-handoff, --pp-layer-partition and the host costs show in the report's pipeline; the fused norm
    makes TP=2 steps shorter; the engine's refusals are exit 2."""
    args = ["simulate", "--gpu", "H200", "--num-gpus", "2", "--qps", "5", "--duration", "5", "--seed", "1",
            "--no-progress"]
    assert main(args + ["--pp", "2", "--pipeline-depth", "3", "--pp-token-handoff", "--pp-layer-partition", "17,15",
                        "--pp-host-step-ms", "1", "--pp-round-trip-ms", "0.5"]) == 0
    pipe = json.loads(capsys.readouterr().out)["pipeline"]
    assert pipe["token_handoff"] is True and pipe["layer_partition"] == [17, 15]
    assert pipe["host_step_s"] == pytest.approx(1e-3) and pipe["round_trip_s"] == pytest.approx(0.5e-3)
    tpot = {}
    for fused in ("off", "push"):
        assert main(args + ["--tp", "2", "--tp-fused-norm", fused]) == 0
        tpot[fused] = json.loads(capsys.readouterr().out)["tpot_p50"]
    assert tpot["push"] < tpot["off"]
    assert main(args + ["--tp", "2", "--pp-token-handoff"]) == 2
    assert "--pp-token-handoff" in capsys.readouterr().err
    assert main(args + ["--pp", "2", "--pp-layer-partition", "20,20"]) == 2
    assert "--pp-layer-partition" in capsys.readouterr().err


def test_plot_of_the_timeline(capsys, tmp_path):
    path = tmp_path / "sim.png"
    assert main(["simulate", "--gpu", "H100-SXM", "--qps", "20", "--duration", "20", "--autoscale",
                 "--polling-s", "5", "--no-progress", "--plot", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    written = report["plot"]  # .svg when matplotlib is not installed
    assert written.startswith(str(tmp_path / "sim.")) and (tmp_path / written.split("/")[-1]).stat().st_size > 500
    assert len(report["timeline"]) >= 50 and {"t", "waiting", "running"} <= set(report["timeline"][0])


def test_replica_model_switch_and_its_fallback_note(capsys):
    args = ["simulate", "--gpu", "H200", "--qps", "5", "--duration", "3", "--no-progress"]
    assert main(args) == 0
    fast = json.loads(capsys.readouterr().out)
    assert main([*args, "--replica-model", "scheduler"]) == 0
    reference = json.loads(capsys.readouterr().out)
    assert (fast["replica_model"], reference["replica_model"]) == ("fast", "scheduler")
    # the same decisions; the fast model's closed-form decode runs round differently in the last bit
    assert fast["completed"] == reference["completed"]
    assert fast["ttft_p99"] == pytest.approx(reference["ttft_p99"], rel=1e-12)
    assert main([*args, "--slo-ttft-ms", "1000"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["replica_model"] == "scheduler"
    assert "does not cover SLO-aware scheduling" in captured.err
    with pytest.raises(SystemExit) as exit_info:  # argparse's one-line usage error
        main([*args, "--replica-model", "bogus"])
    assert exit_info.value.code == 2 and "invalid choice: 'bogus'" in capsys.readouterr().err


def _simulate(capsys, *args: str) -> dict:
    assert main(["simulate", "--gpu", "H200", "--no-progress", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_slo_flags_past_the_knee_hold_goodput_as_the_server_does(capsys):
    """`meshserve simulate` with `meshserve serve`'s flags (--slo-ttft-ms 1000 --slo-tpot-ms 50, one API
    process, every other flag the default) at W3 QPS 96 keeps goodput within 10% of QPS 64's, as the server
    measured on one H200 (2026-11-30: 52.1 req/s at QPS 64, 52.6 at 128 on one API process). Before the
    simulator modelled the API process's gate it predicted 6.2 req/s at 96 (TTFT p50 5 s): a collapse the
    server does not have. --no-frontend-gate is that server-before-the-gate model, and still collapses."""
    slo = ("--slo-ttft-ms", "1000", "--slo-tpot-ms", "50", "--duration", "20")
    at64 = _simulate(capsys, *slo, "--qps", "64")
    at96 = _simulate(capsys, *slo, "--qps", "96")
    assert at64["step_weights"]["mixed_ms"] == pytest.approx(2.7589)  # H200 picks the H200 fit
    assert at96["frontend"]["gate"] is True and at96["frontend"]["api_server_count"] == 1
    assert at64["goodput"] > 45
    assert at96["goodput"] == pytest.approx(at64["goodput"], rel=0.10)
    assert at96["ttft_p50"] < 1.0 and at96["rejected"] > 500
    assert any("gate answers 429" in a for a in at96["assumptions"])
    old = _simulate(capsys, *slo, "--qps", "96", "--no-frontend-gate")
    assert old["frontend"]["gate"] is False and old["goodput"] < 0.5 * at64["goodput"]


def test_front_end_costs_default_to_the_build_modelled(capsys):
    """The API process's costs: the refit of the current server (frontend.FRONTEND_H200) by default, those of
    the server before the gate with --no-frontend-gate, any flag given over either."""
    from meshserve.simulator.frontend import FRONTEND_BEFORE_GATE, FRONTEND_H200

    def costs(report):
        fe = report["frontend"]
        return fe["request_s"], fe["token_s"], fe["refusal_s"]

    base = ("--duration", "2", "--qps", "4")
    assert costs(_simulate(capsys, *base)) == pytest.approx(
        (FRONTEND_H200.per_request_s, FRONTEND_H200.per_token_s, FRONTEND_H200.per_refusal_s))
    assert costs(_simulate(capsys, *base, "--no-frontend-gate")) == pytest.approx(
        (FRONTEND_BEFORE_GATE.per_request_s, FRONTEND_BEFORE_GATE.per_token_s, FRONTEND_BEFORE_GATE.per_refusal_s))
    assert costs(_simulate(capsys, *base, "--no-frontend-gate", "--frontend-token-us", "20")) == pytest.approx(
        (FRONTEND_BEFORE_GATE.per_request_s, 20e-6, FRONTEND_BEFORE_GATE.per_refusal_s))
    off = costs(_simulate(capsys, *base, "--frontend-request-ms", "0", "--frontend-token-us", "0"))
    assert off == (0.0, 0.0, FRONTEND_H200.per_refusal_s)
    assert FRONTEND_H200.per_request_s < FRONTEND_BEFORE_GATE.per_request_s


@pytest.mark.slow
def test_two_replicas_behind_the_router_collapse_at_qps_128(capsys):
    """`serve --data-parallel-size 2` through `meshserve router` (seventh session, 2 x H200, W3 with targets)
    measured 5.1 req/s of goodput at QPS 128 (TTFT p50 14.5 s): the router process saturated. With
    --router-node on and the router of that time (router_calibration.toml [cpu_light]: CPU-measured costs,
    nothing fitted to that run; the default since 2026-12-04 is the router with httptools / uvloop, which holds)
    the simulator collapses there too; without the router hop (the internal back end) it holds two replicas'
    worth."""
    dp2 = ("--num-gpus", "2", "--slo-ttft-ms", "1000", "--slo-tpot-ms", "50", "--duration", "20",
           "--qps", "128")
    internal = _simulate(capsys, *dp2)
    routed = _simulate(capsys, *dp2, "--router-node", "on", "--router-calibration", "cpu_light")
    assert internal["router_node"] is None and internal["goodput"] > 90
    assert routed["router_node"]["busy_fraction"] > 0.95
    assert routed["goodput"] < 0.15 * internal["goodput"] and routed["ttft_p50"] > 5.0
    assert any("router process is one CPU queue" in a for a in routed["assumptions"])
    # an override and the calibration's name reach the config
    # (a short run: only the config is read back)
    slower = _simulate(capsys, *dp2, "--duration", "2", "--router-node", "on", "--router-calibration", "cpu_light",
                       "--router-event-us", "150")
    assert slower["router_node"]["event_s"] == pytest.approx(150e-6)
    assert slower["router_node"]["request_s"] == pytest.approx(1.6e-3)


def test_router_node_without_the_front_end_is_exit_2(capsys):
    assert main(["simulate", "--router-node", "on", "--frontend-request-ms", "0", "--frontend-token-us", "0",
                 "--no-progress"]) == 2
    assert "front-end queue" in capsys.readouterr().err
    assert main(["simulate", "--router-node", "on", "--router-calibration", "nope", "--no-progress"]) == 2
    assert "router_calibration.toml" in capsys.readouterr().err


def test_config_file_sets_flags_and_later_flags_win(capsys, tmp_path):
    """--config FILE: the file's flags (TOML keys without dashes) as if typed where it stands; flags after win."""
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('gpu = "H200"\nnum-gpus = 2\nqps = 4\nduration = 3\nrouter = "round-robin"\nno_progress = true\n')
    assert main(["simulate", "--config", str(cfg), "--num-gpus", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["gpu"] == "H200" and report["replicas"] == 1 and report["router"] == "round-robin"
    assert 0 < report["completed"] <= 4 * 3 * 2
    for text, error in (('router = "random"\n', "router must be one of"), ("num_gpu = 2\n", "unknown flag 'num_gpu'"),
                        ("qps = true\n", "is not a value for --qps"), ("qps = \"fast\"\n", "invalid float value")):
        cfg.write_text(text)
        with pytest.raises(SystemExit) as e:
            main(["simulate", "--config", str(cfg), "--no-progress"])
        assert e.value.code == 2 and error in capsys.readouterr().err


def test_config_file_takes_repeatable_flags_as_lists(capsys, tmp_path):
    cfg = tmp_path / "fleet.toml"
    cfg.write_text('gpu = "H200"\nnum-gpus = 2\nqps = 4\nduration = 3\nno_progress = true\n'
                   'fail-replica = ["0@1+1", "1@2.5+0.5"]\n')
    assert main(["simulate", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [(e["replica"], e["killed_s"]) for e in report["replica_failures"]["events"]] == [(0, 1.0), (1, 2.5)]
    cfg.write_text('gpu = "H200"\nnum-gpus = 2\nqps = 4\nduration = 3\nno_progress = true\n'
                   'hang-replica = "1@0.5+1"\n')
    assert main(["simulate", "--config", str(cfg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["replica_failures"]["events"] == [{"replica": 1, "hung_s": 0.5, "resumed_s": 1.5}]
    assert any("replica hangs 1@0.5+1" in line for line in report["assumptions"])
    cfg.write_text('fail-replica = "0@x"\n')
    with pytest.raises(SystemExit) as e:
        main(["simulate", "--config", str(cfg), "--no-progress"])
    assert e.value.code == 2 and "expected R@T+D" in capsys.readouterr().err


def test_progress_bar_counts_simulated_seconds(capsys):
    """Without --no-progress a tqdm bar on stderr follows simulated time to the last arrival; stdout stays JSON."""
    assert main(["simulate", "--gpu", "H200", "--num-gpus", "2", "--qps", "8", "--duration", "5", "--seed", "1"]) == 0
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert "simulated s" in captured.err and report["completed"] > 0
    last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
    span = max(float(x) for x in last.split("|")[2].split()[0].split("/"))
    assert 4.0 < span <= 5.0


def test_dtype_flags_reach_memory_steps_and_the_report(capsys):
    """--dtype / --kv-dtype (`meshserve plan`'s names): fp8 KV holds about twice the blocks, fp8 weights and KV
    finish a saturated run sooner, the report names both and how they were priced."""
    base = ["simulate", "--model", "llama-3.1-8b", "--gpu", "H200", "--qps", "40", "--duration", "5",
            "--no-progress"]
    reports = {}
    for flags in ((), ("--kv-dtype", "fp8"), ("--dtype", "fp8", "--kv-dtype", "fp8")):
        assert main([*base, *flags]) == 0
        reports[flags] = json.loads(capsys.readouterr().out)
    bf16, kv8, both = reports.values()
    assert (bf16["weight_dtype"], bf16["kv_dtype"], both["weight_dtype"], both["kv_dtype"]) == (
        "bf16", "bf16", "fp8", "fp8")
    assert 1.9 < kv8["kv_blocks_per_replica"] / bf16["kv_blocks_per_replica"] < 2.1
    assert both["tpot_p50"] < kv8["tpot_p50"] < bf16["tpot_p50"]
    assert not any("fp8" in a for a in bf16["assumptions"])
    assert any(a.startswith("fp8 KV cache: the step's KV cache term at 0.761") for a in both["assumptions"])
    with pytest.raises(SystemExit) as exit_info:  # argparse's usage error
        main([*base, "--dtype", "fp4"])
    assert exit_info.value.code == 2 and "--dtype: invalid choice: 'fp4'" in capsys.readouterr().err


def test_a_checkpoints_own_dtype_is_the_default(capsys):
    # DeepSeek-V3's checkpoint stores fp8 weights: simulated so unless --dtype says otherwise (the planner's rule)
    from meshserve.simulator.config import SimConfig

    config = SimConfig(model="deepseek-v3", gpu="H200", num_gpus=8, tp=8)
    assert config.weights_dtype(config.model_spec()) == "fp8"
    assert SimConfig(model="deepseek-v3", weight_dtype="bf16").weights_dtype(config.model_spec()) == "bf16"
    with pytest.raises(InvalidArgumentError, match="--kv-dtype must be one of"):
        SimConfig(kv_dtype="fp4").validate()


def test_expert_parallel_flag_spreads_whole_experts(capsys):
    """--enable-expert-parallel: the layout's EP is the replica's TP for a MoE model (none for a dense one, as the
    engine); under uniform routing each rank reads as many expert bytes as TP's slices, so the steps match and
    the KV pool moves only by the weights' layout; experts that do not divide over --tp are one line, exit 2."""
    from meshserve.simulator.config import SimConfig

    assert SimConfig(model="qwen3-30b-a3b", tp=2, enable_expert_parallel=True).layout.ep == 2
    assert SimConfig(model="llama-3.1-8b", tp=2, enable_expert_parallel=True).layout.ep == 1
    base = ["simulate", "--model", "qwen3-30b-a3b", "--gpu", "H200", "--num-gpus", "2", "--tp", "2", "--qps", "10",
            "--duration", "5", "--no-progress"]
    assert main(base) == 0
    tp = json.loads(capsys.readouterr().out)
    assert main([*base, "--enable-expert-parallel"]) == 0
    ep = json.loads(capsys.readouterr().out)
    assert (tp["expert_parallel"], ep["expert_parallel"]) == (1, 2)
    assert ep["tpot_p50"] == pytest.approx(tp["tpot_p50"], rel=1e-6)
    assert any("expert parallel" in a for a in ep["assumptions"])
    assert main(["simulate", "--model", "qwen3-30b-a3b", "--num-gpus", "3", "--tp", "3", "--enable-expert-parallel",
                 "--no-progress"]) == 2
    assert "128 experts do not divide evenly over --tp 3" in capsys.readouterr().err
