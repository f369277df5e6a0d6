"""`meshserve simulate`'s bad input: one `meshserve: error:` line naming the flag and exit 2, before the
simulation runs (NaN rates were numpy tracebacks, --max-num-seqs 0 an AssertionError, an --output-json in a
missing folder a FileNotFoundError after the whole run, zero lengths and limits ran)."""

from __future__ import annotations

import pytest

from meshserve.cli import main

BASE = ["simulate", "--model", "smollm2-135m", "--qps", "2", "--duration", "2", "--no-progress"]


@pytest.mark.parametrize("flags,message", [
    (["--qps", "nan"], "--qps must be > 0 and finite, got nan"),
    (["--qps", "inf"], "--qps must be > 0 and finite, got inf"),
    (["--duration", "nan"], "--duration must be > 0 and finite, got nan"),
    (["--duration", "1e300"], "--qps 2 x --duration 1e+300 is 2e+300 requests"),
    (["--input-len", "0"], "--input-len must be >= 1, got 0"),
    (["--output-len", "-1"], "--output-len must be >= 1, got -1"),
    (["--prefix-groups", "-1"], "--prefix-groups must be >= 0"),
    (["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
    (["--max-num-batched-tokens", "0"], "--max-num-batched-tokens must be >= 1, got 0"),
    (["--max-model-len", "0"], "--max-model-len must be >= 1, got 0"),
    (["--num-blocks", "0"], "--num-blocks must be >= 1, got 0"),
    (["--max-queue-len", "-1"], "--max-queue-len must be >= 0, got -1"),
    (["--max-outstanding", "0"], "--max-outstanding must be >= 1, got 0"),
    (["--max-outstanding", "4", "--disaggregation", "1:1", "--num-gpus", "2"],
     "--max-outstanding is not modelled with --disaggregation"),
    (["--slo-ttft-ms", "nan"], "--slo-ttft-ms must be > 0, got nan"),
    (["--slo-tpot-ms", "0"], "--slo-tpot-ms must be > 0, got 0.0"),
    (["--ttft-slo", "-1"], "--ttft-slo must be > 0, got -1.0"),
    (["--frontend-latency-ms", "-1"], "--frontend-latency-ms must be >= 0 and finite"),
    (["--frontend-request-ms", "nan"], "--frontend-request-ms must be >= 0 and finite"),
    (["--seed", "-1"], "--seed must be >= 0, got -1"),
    (["--autoscale", "--cooldown-s", "-5"], "autoscaling: need"),
    (["--output-json", "/nonexistent/dir/sim.json"], "--output-json /nonexistent/dir/sim.json: the folder"),
    (["--plot", "/nonexistent/dir/sim.svg"], "--plot /nonexistent/dir/sim.svg: the folder"),
    (["--fail-replica", "3@5+10"], "--fail-replica 3@5+10: the replica must be one of 0-0"),
    (["--fail-replica", "0@5+10", "--autoscale"], "--fail-replica is not modelled with --autoscale"),
    # simulated as if they ran (plan refuses them): smollm2-135m has 9 heads and 30 layers
    (["--num-gpus", "2", "--tp", "2"], "--tp 2: 9 heads not divisible by 2"),
    (["--num-gpus", "64", "--pp", "64"], "--tp 1 --pp 64: PP=64 exceeds 30 layers"),
    (["--max-model-len", "100000"], "--max-model-len 100,000 exceeds smollm2-135m's context of 8,192 tokens"),
    # every request refused, 0 completed, exit 0
    (["--input-len", "5000"], "--input-len 5000 + --output-len 128 exceeds --max-model-len 4096"),
    (["--prefix-groups", "2", "--prefix-len", "4096"], "a prompt of --prefix-len 4096 + 1 + --output-len 128"),
    # ran for hours building replicas / API processes, or printed a 200 KB error line
    (["--num-gpus", "100000000"], "--num-gpus 100,000,000 is 100,000,000 replicas; at most 100,000"),
    (["--api-server-count", "100000000"], "--api-server-count must be 1 to 1,024, got 100000000"),
    (["--search", "--search-gpus", "100000000"], "--search-gpus: counts must be <= 100,000"),
    # NaN or inf from float(): a run that never ended, or a numpy traceback
    (["--fail-replica", "0@1+inf"], "--fail-replica 0@1+inf: the replica must be one of 0-0, the time >= 0 and the "
                                    "downtime > 0 (both finite)"),
    (["--hang-replica", "0@1+nan"], "--hang-replica 0@1+nan: the replica must be one of 0-0"),
    (["--hang-replica", "0@nan+1"], "--hang-replica 0@nan+1: the replica must be one of 0-0"),
    (["--arrivals", "bursty", "--burst-factor", "nan"], "--burst-factor must be >= 1 and finite, got nan"),
    (["--arrivals", "bursty", "--burst-duty", "1"], "--burst-duty must be in (0, 1), got 1.0"),
    # said in seconds (-0.001) for a flag in milliseconds
    (["--slo-ttft-ms", "-1"], "--slo-ttft-ms must be > 0, got -1.0"),
    # "" searched --num-gpus alone; "a" said "invalid literal for int() with base 10"
    (["--search", "--search-gpus", ""], "--search-gpus '': expected comma-separated GPU counts, e.g. 8,16"),
    (["--search", "--search-gpus", "8,a"], "--search-gpus '8,a': expected comma-separated GPU counts"),
])
def test_bad_flags_are_one_line_before_the_run(flags, message, capsys):
    assert main([*BASE, *flags]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the simulation, not after it
    assert captured.err.startswith("meshserve: error: ") and message in captured.err, captured.err
    assert len(captured.err.strip().splitlines()) == 1


def test_an_output_json_that_is_a_folder_is_refused_before_the_run(capsys, tmp_path):
    assert main([*BASE, "--output-json", str(tmp_path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"--output-json {tmp_path}: is a folder" in captured.err


def test_a_bad_layer_partition_names_the_format(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*BASE, "--pp", "2", "--num-gpus", "2", "--pp-layer-partition", "1,x"])
    assert exit_.value.code == 2
    assert "--pp-layer-partition: expected comma-separated layer counts, e.g. 40,40, got '1,x'" in \
        capsys.readouterr().err


@pytest.mark.parametrize("row,message", [
    ('{"arrival_s": 1, "prompt_len": 0, "output_len": 5}', ":2: a trace row needs a finite arrival time, a prompt"),
    ('{"arrival_s": NaN, "prompt_len": 10, "output_len": 5}', ":2: a trace row needs a finite arrival time"),
    ('{"arrival_s": 1, "prompt_len": 10, "output_len": -1}', ":2: a trace row needs"),
])
def test_a_trace_row_out_of_range_names_its_line(row, message, tmp_path, capsys):
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_len": 10, "output_len": 5}\n' + row + "\n")
    assert main(["simulate", "--trace", str(trace), "--no-progress"]) == 2
    assert f"{trace}{message}" in capsys.readouterr().err


def test_a_model_config_with_zero_heads_is_one_line(tmp_path, capsys):
    """It was a ZeroDivisionError traceback in the planner's model (plan and simulate alike)."""
    import json

    from meshserve.models.presets import PRESETS

    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["smollm2-135m"], "num_attention_heads": 0}))
    assert main(["simulate", "--model", str(tmp_path / "config.json"), "--duration", "1", "--no-progress"]) == 2
    assert "config.json's num_attention_heads must be >= 1, got 0" in capsys.readouterr().err
    assert main(["plan", str(tmp_path)]) == 2
    assert "config.json's num_attention_heads must be >= 1, got 0" in capsys.readouterr().err


def test_a_bad_fail_replica_names_the_format(capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*BASE, "--fail-replica", "1@5"])
    assert exit_.value.code == 2
    assert "--fail-replica: expected R@T+D" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main([*BASE, "--hang-replica", "0@5"])
    assert exit_.value.code == 2
    assert "--hang-replica: expected R@T+D (replica, seconds at which it stops answering" in capsys.readouterr().err


@pytest.mark.parametrize("row,message", [
    ("[0, 10, 5]", ":1: not a trace row (expected a JSON object, got list)"),
    ("null", ":1: not a trace row (expected a JSON object, got NoneType)"),
    ('{"arrival_s": 0, "prompt_len": 10}', ":1: not a trace row (missing output_len)"),
    ('{"arrival_s": 0, "prompt_len": 10, "output_len": 5, "prefix_group": "a", "prefix_len": 4}',
     ":1: not a trace row (invalid literal"),
    ('{"arrival_s": 0, "prompt_len": 10, "output_len": 5, "prefix_group": 1, "prefix_len": 40}',
     ":1: a trace row needs a finite arrival time, a prompt length >= 1 (and >= its prefix_len)"),
])
def test_a_trace_row_of_the_wrong_shape_is_one_line(row, message, tmp_path, capsys):
    """A JSON list/null row was an AttributeError traceback, a non-numeric prefix_group a numpy ValueError one
    after the whole file was read, and a prefix longer than its prompt ran a longer prompt than the trace's."""
    trace = tmp_path / "t.jsonl"
    trace.write_text(row + "\n")
    assert main(["simulate", "--model", "smollm2-135m", "--trace", str(trace), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error: ") and f"{trace}{message}" in err, err
    assert len(err.strip().splitlines()) == 1


def test_a_plot_written_as_svg_is_checked_before_the_run(tmp_path, monkeypatch, capsys):
    """Without matplotlib --plot x.png writes x.svg: a folder x.svg was an IsADirectoryError traceback after the
    run (its report lost), and the swap of files was silent."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    (tmp_path / "t.svg").mkdir()
    assert main([*BASE, "--plot", str(tmp_path / "t.png")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and f"--plot {tmp_path / 't.svg'}: is a folder" in captured.err
    assert main([*BASE, "--plot", str(tmp_path / "u.png")]) == 0
    assert (tmp_path / "u.svg").is_file() and not (tmp_path / "u.png").exists()
    assert f"--plot wrote {tmp_path / 'u.svg'} (SVG) instead of {tmp_path / 'u.png'}" in capsys.readouterr().err


@pytest.mark.parametrize("flags,message", [
    (["--gpu", "NOPE"], "unknown GPU 'NOPE'"),
    (["--calibration", "nosuch"], "no calibration 'nosuch'"),
    (["--autoscale", "--min-replicas", "0"], "autoscaling: need 1 <= --min-replicas"),
])
def test_names_looked_up_by_the_run_are_refused_before_the_progress_bar(flags, message, capsys):
    """They were refused once the run had started: the error line came after a progress bar at 0%."""
    assert main([*(f for f in BASE if f != "--no-progress"), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("meshserve: error: ") and message in err and len(err.strip().splitlines()) == 1, err


def test_a_trace_or_config_file_that_is_not_text_is_one_line(tmp_path, capsys):
    """A binary file was a UnicodeDecodeError traceback."""
    binary = tmp_path / "t.jsonl"
    binary.write_bytes(b"\xff\xfe\x00bin")
    assert main(["simulate", "--trace", str(binary), "--no-progress"]) == 2
    assert f"--trace {binary}: not UTF-8 text (invalid start byte)" in capsys.readouterr().err
    config = tmp_path / "c.toml"
    config.write_bytes(b"\xff\xfe\x00bin")
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--config", str(config)])
    assert exit_.value.code == 2
    assert f"--config {config}: not UTF-8 text (invalid start byte)" in capsys.readouterr().err


def test_a_trace_of_requests_all_longer_than_the_context_is_refused(tmp_path, capsys):
    """Each one was refused by the engine's length check: 0 completed, exit 0 (a generated trace was refused)."""
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"arrival_s": 0, "prompt_len": 5000, "output_len": 5}\n'
                     '{"arrival_s": 1, "prompt_len": 4000, "output_len": 100}\n')
    assert main(["simulate", "--trace", str(trace), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and (f"--trace {trace}: every request's prompt + output (at least 4100 tokens) exceeds "
                                   "--max-model-len 4096") in captured.err
