"""SignRound in the project's quantizer: its starting point is round-to-nearest, its learnt rounding fits a
decoder layer's output better than round-to-nearest on the same data, its integers, zeros and scales are
ordinary int4 groups, and the checkpoint the quantizer writes with it loads and matches its dequantization."""

from __future__ import annotations

import copy

import torch

from meshserve import LLM
from meshserve.models.gptq import int4_dequant
from meshserve.models.quantize_checkpoint import CALIBRATIONS, Calibration, quantize_checkpoint, rtn_quantize
from meshserve.models.gptq_sequential import first_layer_inputs
from meshserve.models.signround import (
    PROJECTIONS,
    GroupRounding,
    SignRoundConfig,
    signround_layer,
)
from tests.models.test_quantized_checkpoints import GROUP, PROMPT, _dequantized_copy, _prompt_logprobs

IDS = [[(11 * i + 7 * j) % 300 + 5 for i in range(64)] for j in range(4)]


def test_untrained_rounding_is_round_to_nearest():
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    learnt = GroupRounding(w, GROUP, min_zero=1).export()
    rtn = rtn_quantize(w, GROUP, min_zero=1)
    torch.testing.assert_close(learnt.zeros, rtn.zeros)
    torch.testing.assert_close(learnt.scales, rtn.scales.half().float())
    # the learnt levels hold the checkpoint's fp16 scale: a weight at a rounding boundary may fall either way
    assert (learnt.q == rtn.q).float().mean() > 0.999
    assert torch.equal(learnt.g_idx, rtn.g_idx)


def _layer_error(layer, weights: dict[str, torch.Tensor], inputs, kwargs, targets) -> float:
    layer = copy.deepcopy(layer)
    modules = dict(layer.named_modules())
    for n, w in weights.items():
        modules[n].weight.data = w
    with torch.no_grad():
        return sum(float(torch.mean((layer(x, **kw) - t) ** 2)) for x, kw, t in zip(inputs, kwargs, targets))


def test_learnt_rounding_fits_the_layer_better_than_round_to_nearest(tiny_model_dir, hf_model):
    model = hf_model(tiny_model_dir("llama"))
    inputs, kwargs = first_layer_inputs(model, IDS)
    layer = copy.deepcopy(model.model.layers[0])
    with torch.no_grad():
        targets = [layer(x, **kw) for x, kw in zip(inputs, kwargs)]
    modules = dict(layer.named_modules())
    rtn = {n: int4_dequant(rtn_quantize(modules[n].weight.data, GROUP, min_zero=1)) for n in PROJECTIONS}
    quantized, info = signround_layer(copy.deepcopy(layer), inputs, kwargs, targets, GROUP, min_zero=1,
                                      config=SignRoundConfig(iters=60))
    rtn_err = _layer_error(layer, rtn, inputs, kwargs, targets)
    learnt = {n: int4_dequant(q) for n, q in quantized.items()}
    learnt_err = _layer_error(layer, learnt, inputs, kwargs, targets)
    assert abs(info["rtn_loss"] / rtn_err - 1) < 1e-2  # its start is round-to-nearest (fp16 scales: ~equal)
    assert abs(info["loss"] / learnt_err - 1) < 1e-4  # what it exports is what it scored
    assert info["kept"] == "signround" and learnt_err < 0.9 * rtn_err
    for n, qw in quantized.items():
        assert qw.q.dtype == torch.int32 and int(qw.q.min()) >= 0 and int(qw.q.max()) <= 15, n
        assert torch.equal(qw.zeros, qw.zeros.round()) and qw.zeros.min() >= 1 and qw.zeros.max() <= 15, n
        assert bool((qw.scales > 0).all()), n
        k = modules[n].in_features
        assert torch.equal(qw.g_idx, torch.arange(k, dtype=torch.int32) // GROUP)
    # the clip factors moved some groups' ranges inside the weights' min / max (scale below the plain one)
    plain = rtn_quantize(modules["mlp.down_proj"].weight.data, GROUP, min_zero=1).scales.half().float()
    assert bool((quantized["mlp.down_proj"].scales < plain - 1e-6).any())


def test_signround_checkpoint_matches_its_independent_dequantization(tiny_model_dir, tmp_path, monkeypatch):
    src = tiny_model_dir("llama")
    # the registered calibration, fewer steps (the writer's path is the same; 200 steps cost ~1 min here)
    monkeypatch.setitem(CALIBRATIONS, "awq-scale-signround",
                        Calibration(awq="scale", signround=SignRoundConfig(iters=24)))
    seen: list[dict] = []
    qdir = quantize_checkpoint(src, str(tmp_path / "q"), "gptq", group_size=GROUP,
                               calibration="awq-scale-signround",
                               signround_log=lambda _i, info: seen.append(info))
    assert len(seen) == 2 and all(info["loss"] <= info["rtn_loss"] for info in seen)
    ddir = _dequantized_copy(qdir, str(tmp_path / "d"), "gptq")
    quant = _prompt_logprobs(LLM(qdir), PROMPT)
    plain = _prompt_logprobs(LLM(ddir, tokenizer=src), PROMPT)
    torch.testing.assert_close(quant, plain, atol=2e-4, rtol=1e-4)
