"""SmoothQuant in the project's quantizer: the scales follow max|x|^a / max|w|^(1-a), the folds keep the fp32
model's function, smoothing cuts W8A8 (per-token fp8 activations, per-channel fp8 weights) output error where a
few input features are loud, and the smoothed, static-input-scale checkpoint loads."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from meshserve.kernels.quant_ref import FP8_MAX, fp8_linear_ref, quantize_fp8_per_channel
from meshserve.models.smoothquant import smooth_transform, smoothing_scales
from tests.quant_fixtures import check_fold_keeps_function

IDS = [[(11 * i + 7 * j) % 300 + 5 for i in range(64)] for j in range(3)]


def test_smoothing_scales_follow_the_formula():
    x_max = torch.tensor([1.0, 16.0, 0.0, 4.0])
    w = [torch.tensor([[0.5, 0.25, 1.0, 1.0]]), torch.tensor([[-1.0, 0.1, 2.0, 0.0]])]
    s = smoothing_scales(x_max, w, 0.5)
    w_max = torch.tensor([1.0, 0.25, 2.0, 1.0])
    torch.testing.assert_close(s[[0, 1, 3]], (x_max.sqrt() / w_max.sqrt())[[0, 1, 3]])
    assert s[2] == 1.0  # a feature that never fires is left alone


def test_smoothing_cuts_w8a8_error_where_inputs_are_loud():
    g = torch.Generator().manual_seed(0)
    k, n = 256, 64
    x = torch.randn(512, k, generator=g)
    x[:, ::37] *= 60  # a few outlier features, as in real activations
    w = torch.randn(n, k, generator=g) * 0.05
    ref = x @ w.t()

    def w8a8_error(x_in, w_in):
        wq, ws = quantize_fp8_per_channel(w_in)
        return (fp8_linear_ref(x_in, wq, ws) - ref).pow(2).mean().item()

    s = smoothing_scales(x.abs().amax(dim=0), [w], 0.5)
    plain, smoothed = w8a8_error(x, w), w8a8_error(x / s, w * s)
    # e4m3 is floating point: unlike int8, the quiet features keep their relative precision next to the
    # outliers, so the gain is modest (0.73x here, whatever the outliers' size)
    assert smoothed < 0.8 * plain


def test_folded_scales_keep_the_fp32_function_and_give_input_scales(tiny_model_dir, tmp_path, hf_model):
    src = tiny_model_dir("llama")  # grouped-query attention: o's scale is tied across the heads of a kv head
    tensors = load_file(f"{src}/model.safetensors")
    folded, input_scales = smooth_transform(src, tensors, 0.5, token_ids=IDS)
    dst = check_fold_keeps_function(src, tensors, folded, str(tmp_path / "folded"), hf_model, IDS)
    # static scales: the smoothed input's max over the calibration tokens maps to 448
    seen = []
    model = hf_model(dst)
    hook = model.model.layers[1].mlp.down_proj.register_forward_hook(
        lambda _m, args, _o: seen.append(args[0].abs().amax().item())
    )
    with torch.no_grad():
        for row in IDS:
            model(torch.tensor([row]))
    hook.remove()
    assert input_scales["model.layers.1.mlp.down_proj"] * FP8_MAX == pytest.approx(max(seen), rel=1e-4)
    assert input_scales["model.layers.0.self_attn.q_proj"] == input_scales["model.layers.0.self_attn.v_proj"]
