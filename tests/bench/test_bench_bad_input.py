"""The CPU and offline benchmarks' bad input fails before anything runs, as one error line naming the flag:
argparse's `meshserve bench X: error: argument --flag: ...` or `meshserve: error: ...`, exit status 2.

Before: `bench host --batch 0` said "num_gpu_blocks_override: must be >= 1", `--steps 0` was a
StatisticsError traceback, `bench frontend --step-ms -1` hung, `bench spec` with bad JSON was a
JSONDecodeError traceback, `bench structured --batch-sizes 1,x` a ValueError after loading the model,
`bench tokenizer` onto a file printed success having saved nothing, report paths in missing folders failed
only after the measurement (or with the GPU check first)."""

from __future__ import annotations

import pytest

from meshserve.cli import main


def _exit_code_and_err(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's error
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["host", "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (["host", "--steps", "0"], "argument --steps: must be >= 1, got 0"),
    (["host", "--warmup", "-1"], "argument --warmup: must be >= 0, got -1"),
    (["host", "--spec-ngram", "0"], "argument --spec-ngram: must be >= 1, got 0"),
    (["host", "--kv-offload-gib", "-1"], "argument --kv-offload-gib: must be >= 0, got -1"),  # named the engine arg
    (["channel", "--out-len", "0"], "argument --out-len: must be >= 1, got 0"),
    (["frontend", "--step-ms", "0"], "argument --step-ms: must be > 0, got 0"),  # a ZeroDivisionError after the run
    (["frontend", "--duration", "1", "--ramp-s", "30"], "--ramp-s 30 must be shorter than --duration 1"),
    (["frontend", "--duration", "nan"], "argument --duration: must be a finite number, got 'nan'"),
    (["frontend", "--api-server-count", "1", "0"], "argument --api-server-count: must be >= 1, got 0"),
    (["frontend", "--output-json", "/nonexistent/dir/f.json"], "--output-json /nonexistent/dir/f.json: the folder"),
    (["frontend", "--through-router", "--router-pythonpath", "/nonexistent/src"],
     "--router-pythonpath /nonexistent/src: not a folder"),
    # the server child's ModelLoadError traceback; flags taken without the one they go with, then ignored
    (["frontend", "--model", "nosuch"], "model not found: nosuch is not a model folder"),
    (["frontend", "--tokenizer", "/tmp"], "--tokenizer goes with --model"),
    (["frontend", "--router-pythonpath", "/tmp"], "--router-pythonpath picks the router of --through-router"),
    (["spec", "--speculative-config", "{bad"], "speculative_config: not valid JSON"),
    (["spec", "--k", "1,x"], "argument --k: expected comma-separated whole numbers, got '1,x'"),
    (["spec", "--replay", "0.5,2"], "argument --replay: expected comma-separated probabilities in [0, 1]"),
    (["spec", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["spec", "--output-json", "/nonexistent/dir/s.json"], "--output-json /nonexistent/dir/s.json: the folder"),
    (["structured", "--parts", "accuracy,speed"], "argument --parts: expected any of accuracy, overhead, mask"),
    (["structured", "--batch-sizes", "1,x"], "argument --batch-sizes: expected comma-separated whole numbers"),
    (["structured", "--output-json", "/nonexistent/dir/s.json"], "--output-json /nonexistent/dir/s.json: the folder"),
    (["latency", "--output-json", "/nonexistent/dir/l.json"], "--output-json /nonexistent/dir/l.json: the folder"),
    (["latency", "--curve", "1,x"], "argument --curve: expected comma-separated whole numbers"),
    (["throughput", "--benchmarks-md", "/nonexistent/dir/B.md"], "--benchmarks-md /nonexistent/dir/B.md: the folder"),
    (["tokenizer", "--vocab-size", "2", "/tmp/unused"], "argument --vocab-size: must be >= 4"),
    (["tokenizer", "--model", "nope", "/tmp/unused"], "--model 'nope' is not a preset"),
])
def test_bad_bench_flags_fail_before_anything_runs(argv, message, capsys):
    rc, err = _exit_code_and_err(["bench", *argv], capsys)
    assert rc == 2 and message in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith(("meshserve: error:", "meshserve bench"))


def test_tokenizer_onto_a_file_is_refused(tmp_path, capsys):
    a_file = tmp_path / "tok"
    a_file.write_text("not a folder")
    rc, err = _exit_code_and_err(["bench", "tokenizer", "--vocab-size", "8", str(a_file)], capsys)
    assert rc == 2 and f"output_dir {a_file}: {a_file} is a file, not a folder" in err
    assert a_file.read_text() == "not a folder"
