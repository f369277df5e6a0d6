"""The planner's arithmetic for DeepSeek's multi-head latent attention: parameter counts (exact against the HF
classes), KV bytes per token (one latent + rotary key per token and layer, replicated over TP)."""

from __future__ import annotations

import pytest
import torch

from meshserve.planner.memory import kv_bytes_per_token, stage_shard, weight_bytes
from meshserve.planner.model import load_model, model_from_config
from meshserve.planner.parallel import Layout
from tests.conftest import FAMILIES, VOCAB


@pytest.mark.parametrize("family", ["deepseek_v2", "deepseek_v3"])
def test_parameter_count_is_exact_against_hf(family):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**FAMILIES[family], "vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 192,
              "num_hidden_layers": 3, "num_attention_heads": 4}
    cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(cfg)
    spec = model_from_config({**cfg.to_dict(), **fields, "model_type": cfg.model_type})
    assert spec.is_mla and spec.num_moe_layers == 2
    assert spec.total_params == sum(p.numel() for p in hf.parameters())


def test_published_sizes():
    v3, lite = load_model("deepseek-v3"), load_model("deepseek-v2-lite")
    assert v3.total_params / 1e9 == pytest.approx(671, rel=0.005)  # without the MTP layer
    assert 37 <= v3.active_params / 1e9 <= 38
    assert lite.total_params / 1e9 == pytest.approx(15.7, rel=0.005)
    assert v3.checkpoint_dtype == "fp8" and weight_bytes(v3, "fp8") / 1e9 == pytest.approx(673, rel=0.01)


def test_kv_bytes_per_token_is_the_latent():
    v3 = load_model("deepseek-v3")
    assert kv_bytes_per_token(v3) == 61 * (512 + 64) * 2 == 70_272
    # the same heads without MLA would cache K (192) and V (128) for 128 heads: 71x more
    assert 61 * 128 * (192 + 128) * 2 // kv_bytes_per_token(v3) == 71
    # every TP rank caches the whole latent (heads split, latent replicated)
    shard = stage_shard(v3, Layout(tp=8, pp=1, dp=1, ep=1), 0, "fp8")
    assert shard.kv_bytes_per_token == kv_bytes_per_token(v3)
    # q_a / kv_a are replicated, the rest of attention split over 8
    one = stage_shard(v3, Layout(tp=1, pp=1, dp=1, ep=1), 0, "fp8")
    assert one.dense_weight_bytes / 8 < shard.dense_weight_bytes < one.dense_weight_bytes / 4


def test_non_mla_configs_are_unchanged():
    cfg = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 100}
    spec = model_from_config(cfg)
    assert not spec.is_mla and kv_bytes_per_token(spec) == 2 * 2 * 2 * 16 * 2
