"""Weight loading: what it reports, and dummy weights drawn per checkpoint tensor."""

from __future__ import annotations

import logging

import pytest
import torch

from meshserve.errors import ModelLoadError
from meshserve.models.loader import build_model, resolve_model_source


def test_loading_logs_size_and_time(tiny_model_dir, caplog):
    source = resolve_model_source(tiny_model_dir("llama"))
    with caplog.at_level(logging.INFO, logger="meshserve.models.loader"):
        build_model(source, torch.float32, torch.device("cpu"), 64)
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("loaded "))
    assert " GB of weights from " in line and line.endswith(" s")


def test_dummy_weights_follow_the_seed_and_the_tensor_name(tiny_model_dir):
    source = resolve_model_source(tiny_model_dir("llama"), load_format="dummy")
    a = dict(build_model(source, torch.float32, torch.device("cpu"), 64, seed=1).named_parameters())
    b = dict(build_model(source, torch.float32, torch.device("cpu"), 64, seed=1).named_parameters())
    c = dict(build_model(source, torch.float32, torch.device("cpu"), 64, seed=2).named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    # two tensors of one shape differ: each is drawn from its own name's seed
    assert not torch.equal(a[name], a["model.layers.1.mlp.down_proj.weight"])
    assert torch.all(a["model.norm.weight"] == 1.0)


def test_dummy_weights_like_vllms_share_one_tiny_uniform_draw(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("MESHSERVE_DUMMY_WEIGHTS", "vllm")
    source = resolve_model_source(tiny_model_dir("llama"), load_format="dummy")
    p = dict(build_model(source, torch.float32, torch.device("cpu"), 64, seed=1).named_parameters())
    a, b = p["model.layers.0.mlp.down_proj.weight"], p["model.layers.1.mlp.down_proj.weight"]
    assert torch.equal(a, b)  # one seed for every tensor, as vLLM's dummy loader
    norm = p["model.layers.0.input_layernorm.weight"]
    assert a.abs().max() <= 1e-3 and norm.abs().max() <= 1e-3 and a.std() > 1e-4


def test_dummy_weights_from_shapes_the_driver_gave_build_no_transformers_model(tiny_model_dir, monkeypatch):
    """A rank handed the checkpoint's names and shapes (with_checkpoint_shapes, on the driver) draws the same
    weights without building the HF model: importing transformers' modeling code for that cost each rank
    seconds of its start-up."""
    import transformers

    from meshserve.models import loader

    plain = resolve_model_source(tiny_model_dir("llama"), load_format="dummy")
    given = loader.with_checkpoint_shapes(plain)
    assert given.checkpoint_shapes["model.layers.0.mlp.down_proj.weight"] == (
        plain.hf_config.hidden_size, plain.hf_config.intermediate_size)
    expected = dict(build_model(plain, torch.float32, torch.device("cpu"), 64, seed=1).named_parameters())

    def no_hf_model(*args, **kwargs):
        raise AssertionError("built the HF model for shapes the source already carries")

    monkeypatch.setattr(loader, "_CHECKPOINT_SHAPES", {})  # nothing cached in this process either
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_config", no_hf_model)
    got = dict(build_model(given, torch.float32, torch.device("cpu"), 64, seed=1).named_parameters())
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[n], expected[n]) for n in expected)


def test_load_format_safetensors_cannot_read_the_embedded_gguf_model():
    with pytest.raises(ModelLoadError, match="--load-format safetensors cannot read the embedded default model"):
        resolve_model_source(None, "safetensors")


def test_load_format_gguf_cannot_read_a_model_folder(tiny_model_dir):
    with pytest.raises(ModelLoadError, match="--load-format gguf cannot read the model folder"):
        resolve_model_source(tiny_model_dir("llama"), "gguf")
    assert resolve_model_source(tiny_model_dir("llama"), "safetensors").weights_dir == tiny_model_dir("llama")


def test_load_format_safetensors_cannot_read_a_gguf_file(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelLoadError, match="--load-format safetensors cannot read the GGUF file"):
        resolve_model_source(str(gguf), "safetensors")
