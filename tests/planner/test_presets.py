"""One preset table for generate and plan, and every preset's HF ids (the embedded model's too) work in plan."""

import re

import pytest

from meshserve.cli import main
from meshserve.models.embedded import DEFAULT_MODEL_NAME
from meshserve.models.presets import HF_IDS, PRESETS, find_preset, preset_config, preset_names
from meshserve.planner.model import load_model


def test_every_preset_has_hf_ids_that_resolve_to_it():
    assert set(HF_IDS) == set(PRESETS)
    for name, ids in HF_IDS.items():
        for hf_id in ids:
            assert find_preset(hf_id) == find_preset(hf_id.upper()) == name
            assert load_model(hf_id).total_params == load_model(name).total_params


def test_embedded_model_id_is_accepted_by_plan(capsys):
    assert load_model(DEFAULT_MODEL_NAME).num_layers == 30
    rc = main(["plan", "HuggingFaceTB/SmolLM2-135M-Instruct", "--gpu", "L4"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("HuggingFaceTB/SmolLM2-135M-Instruct on 1× L4") and "chosen: TP=1" in out


@pytest.mark.parametrize("name", list(PRESETS))
def test_each_preset_builds_a_transformers_config_with_the_planner_shapes(name):
    cfg, spec = preset_config(name), load_model(name)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size) == \
        (spec.hidden_size, spec.num_layers, spec.vocab_size)


def _listed(err: str) -> list[str]:
    return re.search(r"preset \(([^)]*)\)", err).group(1).split(", ")


def test_generate_and_plan_list_the_same_presets(capsys):
    assert main(["generate", "--model", "no-such-model", "x"]) == 2
    generate = _listed(capsys.readouterr().err)
    assert main(["plan", "no-such-model"]) == 2
    plan = _listed(capsys.readouterr().err)
    assert generate == plan == preset_names() and len(plan) == 12


def test_a_config_folder_wins_over_a_preset_name(tmp_path, monkeypatch):
    folder = tmp_path / "llama-3.1-8b"
    folder.mkdir()
    (folder / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, '
                                        '"vocab_size": 100}')
    monkeypatch.chdir(tmp_path)
    assert load_model("llama-3.1-8b").hidden_size == 64
