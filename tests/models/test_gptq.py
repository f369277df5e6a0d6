"""GPTQ in the project's quantizer: lower output error than round-to-nearest on the calibration inputs, and
act-order groups that the GPTQ loader reads back."""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import int4_dequant_ref, pack_int4_rows
from meshserve.models.gptq import gptq_quantize
from meshserve.models.quantize_checkpoint import rtn_quantize


def _output_error(x, weight, qw, group_size):
    w = int4_dequant_ref(pack_int4_rows(qw.q), qw.scales, qw.zeros, group_size, qw.g_idx, dtype=torch.float32)
    return ((x @ w - x @ weight.t()) ** 2).mean().item()


def test_gptq_beats_round_to_nearest_on_its_calibration_inputs():
    g = torch.Generator().manual_seed(0)
    k, n, group = 128, 48, 32
    # correlated inputs with a few loud features, as in real activations
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8
    weight = torch.randn(n, k, generator=g) * 0.05
    hessian = 2 * x.double().t() @ x.double() / x.shape[0]
    rtn = _output_error(x, weight, rtn_quantize(weight, group), group)
    gptq = gptq_quantize(weight, hessian, group)
    ordered = gptq_quantize(weight, hessian, group, act_order=True, min_zero=1)
    assert _output_error(x, weight, gptq, group) < 0.7 * rtn
    assert _output_error(x, weight, ordered, group) < 0.7 * rtn
    # act-order: the loudest features lead the first group; every group has group_size members
    assert set(ordered.g_idx[:4].tolist()) == {0}
    assert torch.bincount(ordered.g_idx.long()).tolist() == [group] * (k // group)
    assert ordered.zeros.min() >= 1 and ordered.q.min() >= 0 and ordered.q.max() <= 15


def test_gptq_fp8_beats_per_channel_rounding_on_its_calibration_inputs():
    from meshserve.kernels.quant_ref import FP8_DTYPE, quantize_fp8_per_channel
    from meshserve.models.gptq import gptq_fp8_quantize

    g = torch.Generator().manual_seed(1)
    k, n = 128, 48
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    x[:, :4] *= 8
    weight = torch.randn(n, k, generator=g) * 0.05
    hessian = 2 * x.double().t() @ x.double() / x.shape[0]

    def error(q, s):
        return ((x @ (q.float() * s[:, None]).t() - x @ weight.t()) ** 2).mean().item()

    q, s = gptq_fp8_quantize(weight, hessian)
    rq, rs = quantize_fp8_per_channel(weight)
    assert q.dtype == FP8_DTYPE
    torch.testing.assert_close(s, rs)  # the same per-channel scales: only the rounding differs
    assert error(q, s) < 0.7 * error(rq, rs)
