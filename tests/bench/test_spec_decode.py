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
