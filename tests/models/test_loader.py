"""Weight loading: what it reports, and dummy weights drawn per checkpoint tensor."""

from __future__ import annotations

import logging

import torch

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
