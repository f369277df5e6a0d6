"""AWQ in the project's quantizer: the scale folds keep the fp32 model's function, the searches never lose to
round-to-nearest on their own loss and win where a few input features are loud, and the AWQ checkpoint the
quantizer writes loads and matches its dequantized reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from meshserve import LLM
from meshserve.models.awq import awq_transform, fake_int4, output_error, search_clip, search_scale
from meshserve.models.quantize_checkpoint import quantize_checkpoint
from tests.models.test_quantized_checkpoints import GROUP, PROMPT, _dequantized_copy, _prompt_logprobs
from tests.quant_fixtures import check_fold_keeps_function, save_plain_copy

IDS = [[(11 * i + 7 * j) % 300 + 5 for i in range(64)] for j in range(3)]


def _loud_inputs(k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2048, k, generator=g)
    x[:, :: k // 6] *= 20  # a few loud input features, as in real activations
    return x, torch.randn(48, k, generator=g) * 0.05


def _blocks(x: torch.Tensor) -> torch.Tensor:
    xg = x.double().view(x.shape[0], -1, GROUP).transpose(0, 1)
    return xg.transpose(1, 2) @ xg


def test_scale_search_beats_round_to_nearest_where_inputs_are_loud():
    x, w = _loud_inputs(128)
    blocks = _blocks(x)
    s, info = search_scale([w], x.abs().mean(dim=0), blocks, GROUP)
    rtn = output_error(fake_int4(w, GROUP) - w, blocks)
    awq = output_error(fake_int4(w * s, GROUP) / s - w, blocks)
    assert info["rtn_error"] == pytest.approx(rtn, rel=1e-4) and info["error"] == pytest.approx(awq, rel=1e-4)
    assert info["alpha"] > 0 and awq < 0.7 * rtn
    # the scale is loudest where the input is
    assert s[:: 128 // 6].min() > s.median()


@pytest.mark.parametrize("asymmetric", [False, True])
def test_clip_search_never_loses_to_the_unclipped_rounding(asymmetric):
    x, w = _loud_inputs(96, seed=1)
    blocks = _blocks(x)
    clipped = search_clip(w, blocks, GROUP, asymmetric=asymmetric)
    assert clipped.abs().le(w.abs() + 1e-7).all() and not torch.equal(clipped, w)
    err = output_error(fake_int4(clipped, GROUP) - w, blocks)
    assert err < output_error(fake_int4(w, GROUP) - w, blocks)


def test_folded_scales_keep_the_fp32_function(tiny_model_dir, tmp_path, hf_model):
    src = tiny_model_dir("llama")  # grouped-query attention: o's scale is tied across the heads of a kv head
    tensors = load_file(f"{src}/model.safetensors")
    folded = awq_transform(src, tensors, GROUP, clip=False, token_ids=IDS)
    check_fold_keeps_function(src, tensors, folded, str(tmp_path / "folded"), hf_model, IDS)


def test_awq_brings_the_int4_model_closer_to_fp32_than_round_to_nearest(tiny_model_dir, tmp_path, hf_model):
    src = tiny_model_dir("llama")
    tensors = load_file(f"{src}/model.safetensors")
    ids = torch.tensor(IDS)

    def logits_error(weights, name):
        rounded = {
            n: fake_int4(t, GROUP) if n.startswith("model.layers.") and "_proj" in n else t
            for n, t in weights.items()
        }
        with torch.no_grad():
            quant = hf_model(save_plain_copy(src, str(tmp_path / name), rounded))(ids).logits
            return (quant - hf_model(src)(ids).logits).pow(2).mean().item()

    rtn = logits_error(tensors, "rtn")
    awq = logits_error(awq_transform(src, tensors, GROUP, token_ids=IDS), "awq")
    assert awq < rtn  # a random model has no loud features: the gain is small (the real one: QUANTIZATION.md)


def test_awq_checkpoint_matches_its_independent_dequantization(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), "awq", group_size=GROUP, calibration="awq")
    ddir = _dequantized_copy(qdir, str(tmp_path / "d"), "awq")
    quant = _prompt_logprobs(LLM(qdir), PROMPT)
    plain = _prompt_logprobs(LLM(ddir, tokenizer=src), PROMPT)
    torch.testing.assert_close(quant, plain, atol=2e-4, rtol=1e-4)
