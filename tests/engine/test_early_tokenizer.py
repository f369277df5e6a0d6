"""The front end's tokenizer loads while the core loads, and is handed over only for the folder the core names."""

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest

from meshserve.config import EngineArgs
from meshserve.engine import early_tokenizer
from meshserve.engine.early_tokenizer import EarlyTokenizer, tokenizer_dir_of
from meshserve.errors import ModelLoadError


def test_the_early_tokenizer_is_the_one_the_core_names_else_a_fresh_load(
    tiny_model_dir, tmp_path, monkeypatch
):
    path = tiny_model_dir("llama")
    loads: list[str | None] = []
    real = early_tokenizer.load_tokenizer

    def counting(p):
        loads.append(p)
        return real(p)

    monkeypatch.setattr(early_tokenizer, "load_tokenizer", counting)
    early = EarlyTokenizer(EngineArgs(model=path))
    tok = early.load(path + "/")  # the same folder, spelled otherwise
    assert tok is not None and loads == [path]  # loaded once, early
    assert early.load(None) is None  # a core without a tokenizer: none, whatever was loaded early
    other = str(tmp_path / "other")
    (tmp_path / "other").mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "other" / f).write_text((Path(path) / f).read_text())
    assert early.load(other) is not tok and loads[-1] == other  # the core named another: loaded as before


def test_the_output_processor_s_copy_is_made_on_the_thread_for_the_early_tokenizer(tiny_model_dir, monkeypatch):
    path = tiny_model_dir("llama")
    copied: list[object] = []
    real = copy.deepcopy

    def counting(x):
        copied.append(x)
        return real(x)

    monkeypatch.setattr(early_tokenizer, "copy", SimpleNamespace(deepcopy=counting))  # early_tokenizer's copies
    early = EarlyTokenizer(EngineArgs(model=path))
    tok = early.load(path)
    own = early.copy_of(tok)
    assert copied == [tok]  # once, on the thread, before the tokenizer was handed over
    assert own is not tok and own("hello world")["input_ids"] == tok("hello world")["input_ids"]
    other = early_tokenizer.load_tokenizer(path)  # not the early one: copied now
    assert early.copy_of(other) is not own and copied[-1] is other
    assert early.copy_of(None) is None


def test_the_folder_is_known_early_only_where_the_arguments_say_it(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    assert tokenizer_dir_of(EngineArgs(model="llama-3.1-8b", load_format="dummy", tokenizer=path)) == path
    assert tokenizer_dir_of(EngineArgs(model=path)) == path
    assert tokenizer_dir_of(EngineArgs(model="llama-3.1-8b", load_format="dummy")) is None
    assert tokenizer_dir_of(EngineArgs(model=str(tmp_path / "missing"))) is None


def test_a_failed_early_load_is_retried_where_the_core_asks(tmp_path):
    early = EarlyTokenizer(
        EngineArgs(model="llama-3.1-8b", load_format="dummy", tokenizer=str(tmp_path / "nope"))
    )
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer from"):
        early.load(str(tmp_path / "nope"))  # the same error the plain load gives, raised where the front end loads it



def test_a_model_without_any_tokenizer_is_known_before_the_core_starts(tiny_model_dir, tmp_path):
    """Presets and config.json dummies have no tokenizer (the front end then skips transformers); folders,
    GGUF files, the embedded model or a --tokenizer may have one."""
    from meshserve.engine.early_tokenizer import has_no_tokenizer
    from meshserve.models.loader import resolve_model_source

    config_json = tmp_path / "config.json"
    config_json.write_text((Path(tiny_model_dir("llama")) / "config.json").read_text())
    for args in (EngineArgs(model="qwen3-0.6b", load_format="dummy"),
                 EngineArgs(model=str(config_json), load_format="dummy")):
        assert has_no_tokenizer(args)
        assert resolve_model_source(args.model, args.load_format, args.tokenizer).tokenizer_dir is None
    for args in (EngineArgs(model=tiny_model_dir("llama")), EngineArgs(model=None),
                 EngineArgs(model="qwen3-0.6b", load_format="dummy", tokenizer=tiny_model_dir("llama")),
                 EngineArgs(model=str(config_json), load_format="auto"), EngineArgs(model="model.gguf")):
        assert not has_no_tokenizer(args)
