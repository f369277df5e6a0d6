"""Weight formats as a property of the linear layer: resolving the format, and tensor-parallel slicing of every
format's tensors (checked without processes: each rank's layer is built with the rank patched in, and the
ranks' outputs must concatenate (column-parallel) or sum (row-parallel) to the one-device output)."""

from __future__ import annotations

import pytest
import torch

from meshserve.errors import InvalidArgumentError
from meshserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from meshserve.layers.quantization import check_quant_shapes, quantization_scope, resolve_quant_config
from meshserve.layers.quantization.fp8 import Fp8Config
from meshserve.layers.quantization.int4 import Int4Config
from meshserve.models.quantize_checkpoint import _quant_config, act_order, fp8_tensors, int4_tensors
from tests.layers.tp_ranks import as_rank, one_device_columns


class _Cfg:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


def test_resolve_formats_and_bad_combinations():
    assert resolve_quant_config(_Cfg(), None) is None
    assert resolve_quant_config(_Cfg(), "fp8").online
    awq = resolve_quant_config(_Cfg(_quant_config("awq", 64, False, "", False, False)), None)
    assert awq.name == "awq" and awq.group_size == 64
    gptq = resolve_quant_config(_Cfg(_quant_config("gptq", 128, True, "", False, False)), "gptq")
    assert gptq.desc_act and gptq.zero_offset == 1
    ct = resolve_quant_config(
        _Cfg(_quant_config("compressed-tensors", 0, False, "tensor", True, True)), "fp8"
    )
    assert ct.name == "compressed-tensors" and ct.static_input_scale and not ct.online
    with pytest.raises(
        InvalidArgumentError, match="awq needs a checkpoint whose config.json holds its quantization_config"
    ):
        resolve_quant_config(_Cfg(), "awq")
    with pytest.raises(InvalidArgumentError, match="gptq was asked for but the checkpoint is awq-quantized"):
        resolve_quant_config(_Cfg(_quant_config("awq", 128, False, "", False, False)), "gptq")
    with pytest.raises(InvalidArgumentError, match="bitsandbytes.*is not supported"):
        resolve_quant_config(_Cfg({"quant_method": "bitsandbytes"}), None)
    with pytest.raises(InvalidArgumentError, match="8-bit weights is not supported"):
        resolve_quant_config(_Cfg({"quant_method": "gptq", "bits": 8}), None)
    # (block-wise fp8: tests/layers/test_fp8_block.py)
    with pytest.raises(InvalidArgumentError, match="block-wise fp8 loads"):
        resolve_quant_config(_Cfg({"quant_method": "fp8", "weight_block_size": [64, 128]}), None)
    # dummy weights: quantized online in the asked format
    assert resolve_quant_config(_Cfg(), "awq", "dummy").online


def test_act_order_must_agree_across_merged_projections(monkeypatch):
    as_rank(monkeypatch, 1, 0)
    with quantization_scope(Int4Config("gptq", GROUP, desc_act=True)):
        layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
    g = torch.Generator().manual_seed(3)
    gate, up = torch.randn(INTER, HIDDEN, generator=g), torch.randn(INTER, HIDDEN, generator=g)
    g_idx = layer.g_idx
    g_idx.weight_loader(g_idx, int4_tensors(gate, "gptq", GROUP, desc_act=True)["g_idx"], 0)
    with pytest.raises(ValueError, match="g_idx differs"):
        g_idx.weight_loader(g_idx, int4_tensors(up, "gptq", GROUP, desc_act=True)["g_idx"], 1)


def test_group_size_checked_against_the_model_before_loading():
    hf = _Cfg()
    hf.hidden_size, hf.num_attention_heads, hf.head_dim, hf.intermediate_size = 256, 4, 64, 384
    check_quant_shapes(Int4Config("awq", 128), hf, 1)
    with pytest.raises(InvalidArgumentError, match=r"128 does not divide the 192 .*down_proj.* per rank"):
        check_quant_shapes(Int4Config("gptq", 128), hf, 2)
    check_quant_shapes(Int4Config("gptq", 128, desc_act=True), hf, 2)  # act-order ranks keep every group
    with pytest.raises(InvalidArgumentError, match=r"group size 96 does not divide the 256"):
        check_quant_shapes(Int4Config("awq", 96), hf, 1)


def test_group_size_must_divide_each_ranks_input_features(monkeypatch):
    as_rank(monkeypatch, 2, 0)
    with quantization_scope(Int4Config("awq", 64)), pytest.raises(ValueError, match="group size 64 does not"):
        RowParallelLinear(96, 32)  # 48 input features per rank


# ----------------------------------------------------------------------------------------------------------
# tensor-parallel slicing of every format
# ----------------------------------------------------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, GROUP = 128, 4, 2, 16, 128, 32


def _checkpoint(fmt: str, weight: torch.Tensor, perm: torch.Tensor) -> dict[str, torch.Tensor]:
    if fmt == "bf16":
        return {"weight": weight}
    if fmt in ("awq", "gptq", "gptq-act-order"):
        return int4_tensors(weight, fmt[:4], GROUP, desc_act=fmt == "gptq-act-order", perm=perm)
    strategy, static = {"fp8-channel": ("channel", None), "fp8-tensor-static": ("tensor", 0.05)}[fmt]
    return fp8_tensors(weight, "compressed-tensors", strategy, static)


def _config(fmt: str):
    return {
        "bf16": None,
        "awq": Int4Config("awq", GROUP),
        "gptq": Int4Config("gptq", GROUP),
        "gptq-act-order": Int4Config("gptq", GROUP, desc_act=True),
        "fp8-channel": Fp8Config("compressed-tensors"),
        "fp8-tensor-static": Fp8Config("compressed-tensors", static_input_scale=True),
    }[fmt]


def _build(kind: str, fmt: str, tp: int, rank: int, monkeypatch, weights):
    as_rank(monkeypatch, tp, rank)
    with quantization_scope(_config(fmt)):
        if kind == "qkv":
            layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True)
        elif kind == "merged":
            layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
        else:
            layer = RowParallelLinear(INTER, HIDDEN, bias=True)
    params = dict(layer.named_parameters())
    perm = act_order([w for w, _ in weights.values()])  # merged projections share their input's order
    with torch.no_grad():
        for shard, (w, b) in weights.items():
            for suffix, tensor in _checkpoint(fmt, w, perm).items():
                params[suffix].weight_loader(params[suffix], tensor, *([] if shard is None else [shard]))
            if b is not None:
                params["bias"].weight_loader(params["bias"], b, *([] if shard is None else [shard]))
        layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("fmt", ["bf16", "fp8-channel", "fp8-tensor-static", "awq", "gptq", "gptq-act-order"])
@pytest.mark.parametrize("kind", ["qkv", "merged", "row"])
def test_tensor_parallel_slices_every_format(fmt, kind, monkeypatch):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    if kind == "qkv":
        weights = {
            "q": (rand(HEADS * HEAD_DIM, HIDDEN), rand(HEADS * HEAD_DIM)),
            "k": (rand(KV_HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM)),
            "v": (rand(KV_HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM)),
        }
    elif kind == "merged":
        weights = {0: (rand(INTER, HIDDEN), None), 1: (rand(INTER, HIDDEN), None)}
    else:
        weights = {None: (rand(HIDDEN, INTER), rand(HIDDEN))}
    x = torch.randn(3, INTER if kind == "row" else HIDDEN, generator=g)
    full = _build(kind, fmt, 1, 0, monkeypatch, weights)(x)
    # the one-device layer computes the (dequantized) projection of the checkpoint
    ref = torch.cat([x @ w.t() + (b if b is not None else 0) for w, b in weights.values()], dim=-1)
    tol = {"bf16": 1e-5, "fp8-channel": 0.05, "fp8-tensor-static": 0.05}.get(fmt, 0.12)  # int4: ~8%
    assert (full - ref).norm() / ref.norm() < tol
    ranks = [_build(kind, fmt, 2, r, monkeypatch, weights) for r in range(2)]
    if kind == "row":
        x_parts = x.chunk(2, dim=-1)
        combined = ranks[0](x_parts[0]) + ranks[1](x_parts[1])
        if fmt == "fp8-channel":  # dynamic per-token scales: each rank scales its own half of the row
            assert (combined - full).norm() / full.norm() < 0.05
        else:
            torch.testing.assert_close(combined, full, atol=2e-5, rtol=1e-4)
        return
    outs = [layer(x) for layer in ranks]
    combined = one_device_columns(kind, outs, HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2)
    torch.testing.assert_close(combined, full, atol=1e-5, rtol=1e-5)
