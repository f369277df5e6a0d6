"""MESHSERVE_GRAMMAR_PROBE (engine/grammar_probe.py): constrained requests keep the engine's grammar path but not
the grammar's work, so their greedy tokens are the free ones; no_matchers still applies (all-ones) masks,
no_masks none; an unknown value is refused."""

from __future__ import annotations

import json

import pytest

from meshserve import LLM, SamplingParams
from meshserve.engine.grammar_probe import grammar_probe

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture(scope="module")
def path(tiny_model_dir):
    return tiny_model_dir("llama")


def _tokens(path, constrained: bool, trace=None) -> list[list[int]]:
    llm = LLM(model=path, async_scheduling=True, max_model_len=256, step_trace=str(trace) if trace else None)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                structured_outputs={"json": SCHEMA} if constrained else None)
        outs = llm.generate([[5, 6, 7, 8] * 5, [9, 10, 11] * 6], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("probe,masked", [("no_matchers", True), ("no_masks", False)])
def test_probe_leaves_the_grammar_out_but_keeps_its_path(path, monkeypatch, tmp_path, probe, masked):
    free = _tokens(path, constrained=False)
    monkeypatch.setenv("MESHSERVE_GRAMMAR_PROBE", probe)
    trace = tmp_path / "steps.jsonl"
    assert _tokens(path, constrained=True, trace=trace) == free  # an all-allowing mask changes no argmax
    rows = [json.loads(line) for line in trace.read_text().splitlines()]
    assert any(r["masked_rows"] for r in rows) == masked


def test_unknown_probe_is_refused(monkeypatch):
    monkeypatch.setenv("MESHSERVE_GRAMMAR_PROBE", "nope")
    with pytest.raises(ValueError, match="no_matchers"):
        grammar_probe()
    monkeypatch.delenv("MESHSERVE_GRAMMAR_PROBE")
    assert grammar_probe() is None
