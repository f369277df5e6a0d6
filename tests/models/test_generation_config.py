"""Sampling defaults from generation_config.json: its fields, the modes of --generation-config, the fallback."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from meshserve import SamplingParams
from meshserve.config import EngineArgs
from meshserve.errors import InvalidArgumentError
from meshserve.models.generation_defaults import load_generation_defaults

_LLAMA3_STYLE = {"bos_token_id": 1, "eos_token_id": [2, 3], "do_sample": True, "temperature": 0.6,
                 "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 64,
                 "max_length": 4096, "transformers_version": "4.45.0"}


def _folder(tmp_path: Path, name: str, fields: dict | str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    text = fields if isinstance(fields, str) else json.dumps(fields)
    (folder / "generation_config.json").write_text(text)
    return folder


def test_sampling_fields_are_read_and_renamed(tmp_path: Path) -> None:
    defaults = load_generation_defaults(str(_folder(tmp_path, "m", _LLAMA3_STYLE)))
    # token ids, max_length and do_sample are not sampling defaults
    assert defaults == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05,
                        "repetition_penalty": 1.1, "max_tokens": 64}
    params = SamplingParams(**defaults)
    assert (params.temperature, params.max_tokens) == (0.6, 64)


def test_token_ids_only_give_no_defaults(tmp_path: Path) -> None:
    folder = _folder(tmp_path, "m", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2})
    assert load_generation_defaults(str(folder)) == {}
    assert load_generation_defaults(str(tmp_path / "no-such-folder")) == {}
    assert load_generation_defaults(None) == {}


def test_modes(tmp_path: Path) -> None:
    model = _folder(tmp_path, "model", _LLAMA3_STYLE)
    other = _folder(tmp_path, "other", {"temperature": 0.0})
    assert load_generation_defaults(str(model), "vllm") == {}
    assert load_generation_defaults(str(model), str(other)) == {"temperature": 0.0}


def test_fallback_stands_in_only_when_the_file_sets_nothing(tmp_path: Path) -> None:
    bare = _folder(tmp_path, "bare", {"eos_token_id": 2})
    assert load_generation_defaults(str(bare), "auto", {"temperature": 0.0}) == {"temperature": 0.0}
    assert load_generation_defaults(str(bare), "vllm", {"temperature": 0.0}) == {}
    model = _folder(tmp_path, "model", {"top_p": 0.5})
    assert load_generation_defaults(str(model), "auto", {"temperature": 0.0}) == {"top_p": 0.5}


def test_unreadable_file_is_ignored_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder(tmp_path, "m", "{not json")
    with caplog.at_level(logging.WARNING):
        assert load_generation_defaults(str(folder)) == {}
    assert "generation_config.json" in caplog.text


def test_wrong_types_are_skipped_with_a_warning_naming_key_and_file(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder(tmp_path, "m", {"temperature": "hot", "top_k": True, "top_p": None, "min_p": 0.1})
    with caplog.at_level(logging.WARNING, logger="meshserve.models.generation_defaults"):
        assert load_generation_defaults(str(folder)) == {"min_p": 0.1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    path = str(folder / "generation_config.json")
    assert len(warned) == 2  # temperature and top_k; a null is only unset
    assert any("temperature" in m and path in m and "'hot'" in m for m in warned), warned
    assert any("top_k" in m and path in m for m in warned), warned


def test_a_file_that_is_not_an_object_is_ignored_with_a_warning(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    folder = _folder(tmp_path, "m", "[0.7]")
    with caplog.at_level(logging.WARNING, logger="meshserve.models.generation_defaults"):
        assert load_generation_defaults(str(folder)) == {}
    assert "not a JSON object" in caplog.text


def test_engine_args_check_the_mode(tmp_path: Path) -> None:
    EngineArgs(generation_config="vllm").validate()
    EngineArgs(generation_config=str(_folder(tmp_path, "m", {"temperature": 0.0}))).validate()
    for bad in ("none", str(tmp_path)):  # an unknown word; a folder without generation_config.json
        with pytest.raises(InvalidArgumentError, match="generation_config: must be auto, vllm or a folder"):
            EngineArgs(generation_config=bad).validate()
