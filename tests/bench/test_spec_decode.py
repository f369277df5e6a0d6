"""`meshserve bench spec --w1`: W1's token prompt without and with a speculative config (here an EAGLE-3 head
with random weights), greedy outputs compared."""

from __future__ import annotations

import argparse
import json

from transformers import AutoConfig

from meshserve.bench.spec_decode import add_spec_parser
from meshserve.spec_decode.eagle3_random_head import head_config, random_head_tensors, write_head
from tests.conftest import make_tiny_checkpoint


def test_w1_with_an_eagle3_head(tmp_path):
    target = make_tiny_checkpoint(
        str(tmp_path / "target"), "llama", with_tokenizer=False, num_hidden_layers=8
    )
    cfg = AutoConfig.from_pretrained(target)
    head = write_head(str(tmp_path / "head"), head_config(cfg, 48), random_head_tensors(cfg, 48))
    parser = argparse.ArgumentParser()
    add_spec_parser(parser.add_subparsers())
    spec = {"method": "eagle3", "model": head, "num_speculative_tokens": 2}
    out = tmp_path / "out.json"
    ns = parser.parse_args(
        [
            "spec",
            "--model",
            target,
            "--w1",
            "--k",
            "1,2",
            "--max-tokens",
            "12",
            "--max-model-len",
            "256",
            "--speculative-config",
            json.dumps(spec),
            "--output-json",
            str(out),
        ]
    )
    assert ns.func(ns) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["k"] for r in rows] == [1, 2]
    for r in rows:
        assert r["method"] == "eagle3" and r["identical"] and r["tokens"] == 12
        assert r["draft_tokens"] > 0 and r["draft_ms"] > 0


def test_forced_replay_at_batch_4_is_identical_and_reports_the_gate(tmp_path):
    """--replay --replay-forced at batch > 1: the references stand in for every greedy pick (verify and plain
    rows alike), so the outputs equal the run without speculation at every acceptance; the gate's measured
    step times are those at the run's batch (issue 22: 'identical False' and gate_step_s None at batch 64)."""
    target = make_tiny_checkpoint(str(tmp_path / "target"), "llama", with_tokenizer=False)
    parser = argparse.ArgumentParser()
    add_spec_parser(parser.add_subparsers())
    out = tmp_path / "out.json"
    ns = parser.parse_args(["spec", "--model", target, "--dtype", "float32", "--replay", "0.5,1",
                            "--replay-k", "3", "--replay-forced", "--batch-size", "4", "--max-tokens", "24",
                            "--max-model-len", "256", "--output-json", str(out)])
    assert ns.func(ns) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["token_right_p"] for r in rows] == [0.5, 1.0]
    for r in rows:
        assert r["identical"] and r["batch"] == 4 and r["drafts"] > 0
        assert r["gate_verify_s"] is not None and r["gate_verify_s"] > 0
    assert rows[0]["acceptance_rate"] < 1.0 == rows[1]["acceptance_rate"]
