"""The residual-stream rotation (models/rotation.py): its matrices are orthogonal, the rotated fp32 checkpoint
computes the same logits as the original through transformers (norm weights folded, the tied head untied), and
the rotated then int4-quantized checkpoint loads in the engine and stays as close to the fp32 model as the
unrotated one does."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from meshserve import LLM
from meshserve.models.quantize_checkpoint import quantize_checkpoint
from meshserve.models.rotation import hadamard, random_orthogonal, rotate_checkpoint, rotation_matrix
from tests.models.test_quantized_checkpoints import PROMPT, _dequantized_copy, _prompt_logprobs

IDS = [[(11 * i + 7 * j) % 300 + 5 for i in range(48)] for j in range(2)]


@pytest.mark.parametrize("n", [1, 2, 12, 24, 48, 64, 72, 576])
def test_hadamard_is_a_hadamard_matrix(n):
    h = hadamard(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_no_hadamard_is_invented_for_an_order_without_a_construction():
    with pytest.raises(ValueError):
        hadamard(36)  # one exists, but neither Sylvester nor Paley I builds it (35 is not prime)


@pytest.mark.parametrize("kind", ["random", "hadamard"])
def test_rotations_are_orthogonal_and_seeded(kind):
    q = rotation_matrix(kind, 96, seed=0)
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64))
    assert torch.equal(q, rotation_matrix(kind, 96, seed=0))
    assert not torch.allclose(q, rotation_matrix(kind, 96, seed=1))


def test_random_orthogonal_is_not_sign_biased():
    # Householder QR alone leans Q's diagonal negative (its mean over 400 seeds of 8 x 8: about -0.27 per
    # entry); Haar-random Q has a zero-mean diagonal (with the sign fix: |mean| < 0.03 on these seeds)
    diagonals = torch.stack([torch.diagonal(random_orthogonal(8, s)) for s in range(400)])
    assert diagonals.mean(0).abs().max() < 0.1


@pytest.fixture(scope="module")
def tied_model_dir(tmp_path_factory):
    """A tiny Llama with tied embeddings and random (non-unit) norm weights, so every fold is exercised."""
    from tests.conftest import make_tiny_checkpoint

    path = str(tmp_path_factory.mktemp("tied-llama"))
    make_tiny_checkpoint(path, "llama", tie_word_embeddings=True)
    tensors = load_file(f"{path}/model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for name, t in tensors.items():
        if name.endswith("norm.weight"):
            tensors[name] = 0.5 + torch.rand(t.shape, generator=gen)
    from safetensors.torch import save_file

    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("kind,heads", [("random", False), ("hadamard", False), ("hadamard", True)])
def test_rotated_checkpoint_keeps_the_fp32_logits(tied_model_dir, tmp_path, hf_model, kind, heads):
    dst = rotate_checkpoint(tied_model_dir, str(tmp_path / "rot"), kind, seed=3, heads=heads)
    with open(f"{dst}/config.json") as f:
        assert json.load(f)["tie_word_embeddings"] is False
    before, after = load_file(f"{tied_model_dir}/model.safetensors"), load_file(f"{dst}/model.safetensors")
    assert "lm_head.weight" not in before and "lm_head.weight" in after
    assert all(torch.equal(after[n], torch.ones_like(after[n])) for n in after if n.endswith("norm.weight"))
    for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
        assert (after[name] - before[name]).abs().max() > 0.1  # really rotated, not copied
    x = torch.tensor(IDS)
    with torch.no_grad():
        ref, rot = hf_model(tied_model_dir)(x).logits, hf_model(dst)(x).logits
    assert (rot - ref).abs().max() < 1e-4
    assert ref.abs().max() > 1.0  # logits large enough that a wrong fold could not hide under the bound


@pytest.mark.slow  # two sequential calibrations, four engine loads: 3 s quiet, 70 s beside a bench run
def test_rotated_int4_checkpoint_loads_and_stays_close_to_fp32(tied_model_dir, tmp_path):
    """The rotated recipe's checkpoint (untied head, int4 projections) runs in the engine on what its file
    holds, and its logprobs are within 1.5x the unrotated recipe's error of the fp32 model's."""
    opts = dict(group_size=32, desc_act=True)
    plain = quantize_checkpoint(tied_model_dir, str(tmp_path / "plain"), "gptq",
                                calibration="awq-scale-gptq-mse-seq", **opts)
    rot = quantize_checkpoint(tied_model_dir, str(tmp_path / "rot"), "gptq",
                              calibration="rot-hadamard-awq-scale-gptq-mse-seq", **opts)
    with open(f"{rot}/config.json") as f:
        config = json.load(f)
    assert config["tie_word_embeddings"] is False and config["quantization_config"]["desc_act"] is True
    assert "model.layers.0.self_attn.q_proj.qweight" in load_file(f"{rot}/model.safetensors")
    ref = _prompt_logprobs(LLM(tied_model_dir), PROMPT)
    err_plain = (_prompt_logprobs(LLM(plain, tokenizer=tied_model_dir), PROMPT) - ref).abs().mean()
    rot_lp = _prompt_logprobs(LLM(rot, tokenizer=tied_model_dir), PROMPT)
    err_rot = (rot_lp - ref).abs().mean()
    # measured 0.91 against 0.85 (a random model has no outlier features for the rotation to spread)
    assert err_rot < 1.5 * err_plain, (err_rot, err_plain)
    # the engine reads what the file holds: the same logprobs as the independently dequantized weights
    plain_copy = _dequantized_copy(rot, str(tmp_path / "rot-dequantized"), "gptq")
    torch.testing.assert_close(rot_lp, _prompt_logprobs(LLM(plain_copy, tokenizer=tied_model_dir), PROMPT),
                               atol=2e-4, rtol=1e-4)
