"""Sequential GPTQ: every projection's Hessian comes from the inputs it sees with everything before it
already quantized (earlier layers, and within a layer q/k/v before o before gate/up before down)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from meshserve.models.gptq import collect_hessians
from meshserve.models.gptq_sequential import sequential_quantize

IDS = [[(11 * i + 7 * j) % 300 + 5 for i in range(32)] for j in range(2)]


@pytest.mark.slow  # three transformers loads and two calibration passes: ~8 s on a quiet 2-core CPU
def test_sequential_hessians_are_the_quantized_models_own(tiny_model_dir):
    """With a deterministic quantizer (here: weights rounded to a coarse grid), the Hessian sequential GPTQ
    hands each projection equals the one the fully quantized model's forward gives that projection: its
    input depends only on what came before it, all quantized by then."""
    src = tiny_model_dir("llama")
    calls: list[str] = []
    hessians: dict[str, torch.Tensor] = {}

    def quantize(name, weight, hessian):
        calls.append(name)
        hessians[name] = hessian
        held = (weight / 0.05).round() * 0.05
        return {"weight": held}, held

    parts = sequential_quantize(src, IDS, quantize)
    layer0 = [c.split(".", 3)[3] for c in calls if c.startswith("model.layers.0.")]
    mlp = [f"mlp.{p}_proj" for p in ("gate", "up", "down")]
    assert layer0 == [f"self_attn.{p}_proj" for p in "qkvo"] + mlp
    assert calls.index("model.layers.1.self_attn.q_proj") > calls.index("model.layers.0.mlp.down_proj")
    state = load_file(f"{src}/model.safetensors")
    quantized = {**state, **{f"{n}.weight": p["weight"] for n, p in parts.items()}}
    expected = collect_hessians(src, IDS, set(parts), state_dict=quantized)
    for name in parts:
        torch.testing.assert_close(hessians[name], expected[name], rtol=1e-4, atol=1e-6)
    # and they differ from the clean model's where earlier rounding reached the input
    clean = collect_hessians(src, IDS, {"model.layers.1.self_attn.q_proj"}, state_dict=state)
    name = "model.layers.1.self_attn.q_proj"
    assert not torch.allclose(clean[name], hessians[name])
