"""`meshserve plan` through meshserve.cli.main: table, --json, --claim, --calibrate, one-line errors."""

import json
import subprocess
import sys

from meshserve.cli import main


def run(capsys, *argv):
    rc = main(["plan", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_plan_table_for_70b(capsys):
    rc, out, _ = run(capsys, "llama-3.1-70b", "--gpu", "H100-SXM", "--num-gpus", "4")
    assert rc == 0
    assert "70.55 B parameters" in out and "141.1 GB" in out and "327,680 bytes/token" in out
    assert "42.9 GB per 131,072-token sequence" in out
    assert "chosen: TP=4" in out and "TP=2×DP=2: needs" in out


def test_plan_never_prints_the_naive_kv_figure(capsys):
    for argv in (["llama-3.1-70b", "--num-gpus", "4"], ["llama-3.1-70b", "--num-gpus", "8", "--json"],
                 ["llama-3.1-70b", "--num-gpus", "8", "--max-model-len", "131072", "--objective", "latency"]):
        _, out, _ = run(capsys, *argv)
        # 64 query heads instead of 8 KV heads would give 2,621,440 B/token, ~167-172 GB or ~344 GB at 128K
        for naive in ("167", "171.8", "343.6", "2,621,440", "2621440"):
            assert naive not in out


def test_plan_json(capsys):
    rc, out, _ = run(capsys, "llama-3.1-8b", "--num-gpus", "8", "--json")
    data = json.loads(out)
    assert rc == 0 and data["chosen"] == "TP=1×DP=8" and data["model"]["kv_bytes_per_token"] == 131072
    assert data["candidates"][0]["prediction"]["output_tok_per_s"] > 0 and data["rejected"]


def test_plan_claim_above_roofline(capsys):
    rc, out, _ = run(capsys, "llama-3.1-70b", "--num-gpus", "4", "--concurrency", "32", "--claim", "5000")
    assert rc == 1 and "claim: IMPOSSIBLE" in out and "3,039 tok/s" in out
    rc, out, _ = run(capsys, "llama-3.1-70b", "--num-gpus", "4", "--concurrency", "32", "--claim", "2000")
    assert rc == 0 and "claim: possible" in out


def test_plan_405b_one_node_does_not_fit(capsys):
    rc, out, _ = run(capsys, "llama-3.1-405b", "--num-gpus", "8")
    assert rc == 1 and "no fit:" in out
    rc, out, _ = run(capsys, "llama-3.1-405b", "--num-gpus", "16", "--nodes", "2")
    assert rc == 0 and "chosen: TP=8×PP=2" in out


def test_plan_calibrate(tmp_path, capsys):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps([{"gpu": "H100-SXM", "model": "llama-3.1-8b", "batch": 1, "workload": "W1",
                                 "output_tok_per_s": 153.0}]))
    rc, out, _ = run(capsys, "--calibrate", str(path))
    assert rc == 0 and "| H100-SXM | llama-3.1-8b | TP=1 | 1 | W1 | 153.0 |" in out
    assert "efficiency = " in out


def test_plan_list_gpus(capsys):
    rc, out, _ = run(capsys, "--list-gpus")
    assert rc == 0 and "MI300X" in out and "assumptions" in out


def test_errors_are_one_line(capsys):
    for argv in (["no-such-model"], ["llama-3.1-8b", "--gpu", "Voodoo5"], ["llama-3.1-8b", "--num-gpus", "16"],
                 [], ["llama-3.1-8b", "--hardware-file", "/nonexistent.toml"]):
        rc, _, err = run(capsys, *argv)
        err = err.strip()
        assert rc == 2 and err.startswith("meshserve: error: ") and "\n" not in err


def test_planner_imports_no_torch():
    code = ("import sys, meshserve.planner.cli, meshserve.planner.auto, meshserve.planner.model; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False False"
