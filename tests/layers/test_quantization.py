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
    if fmt == "gptq-act-order-64":  # groups of the half GEMV's step: sorted by group at load
        return int4_tensors(weight, "gptq", 64, desc_act=True, perm=perm)
    strategy, static = {"fp8-channel": ("channel", None), "fp8-tensor-static": ("tensor", 0.05)}[fmt]
    return fp8_tensors(weight, "compressed-tensors", strategy, static)


def _config(fmt: str):
    return {
        "bf16": None,
        "awq": Int4Config("awq", GROUP),
        "gptq": Int4Config("gptq", GROUP),
        "gptq-act-order": Int4Config("gptq", GROUP, desc_act=True),
        "gptq-act-order-64": Int4Config("gptq", 64, desc_act=True),
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


@pytest.mark.parametrize(
    "fmt", ["bf16", "fp8-channel", "fp8-tensor-static", "awq", "gptq", "gptq-act-order", "gptq-act-order-64"]
)
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
    full_layer = _build(kind, fmt, 1, 0, monkeypatch, weights)
    full = full_layer(x)
    # the one-device layer computes the (dequantized) projection of the checkpoint
    ref = torch.cat([x @ w.t() + (b if b is not None else 0) for w, b in weights.values()], dim=-1)
    tol = {"bf16": 1e-5, "fp8-channel": 0.05, "fp8-tensor-static": 0.05}.get(fmt, 0.12)  # int4: ~8%
    assert (full - ref).norm() / ref.norm() < tol
    ranks = [_build(kind, fmt, 2, r, monkeypatch, weights) for r in range(2)]
    if fmt.startswith("gptq-act-order"):  # groups of 64 sorted at load where each layer holds whole groups:
        # at TP = 1 and on column-parallel ranks; a row-parallel rank's half of K holds parts of groups
        sorted_ = [fmt.endswith("64") and not (layer is not full_layer and kind == "row")
                   for layer in (full_layer, *ranks)]
        assert [layer.perm is not None for layer in (full_layer, *ranks)] == sorted_
        assert [layer.g_idx is None for layer in (full_layer, *ranks)] == sorted_
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


# ----------------------------------------------------------------------------------------------------------
# act-order weights sorted by group at load
# ----------------------------------------------------------------------------------------------------------
def _unsorted(monkeypatch):
    """Layers built from now on keep act-order weights as loaded (g_idx, the grouped kernel): the path before
    the sort, as the oracle."""
    from meshserve.layers.quantization.int4 import Int4LinearMethod

    monkeypatch.setattr(Int4LinearMethod, "_sort_act_order", staticmethod(lambda layer, q, g, groups: (q, g, None)))


@pytest.mark.parametrize("kind", ["merged", "row"])
def test_act_order_weights_are_sorted_by_group_at_load(kind, monkeypatch):
    from meshserve.kernels.quant_ref import int4_linear_ref, unpack_int4_rows

    g = torch.Generator().manual_seed(5)
    if kind == "merged":
        weights = {0: (torch.randn(INTER, HIDDEN, generator=g) * 0.1, None),
                   1: (torch.randn(INTER, HIDDEN, generator=g) * 0.1, None)}
    else:
        weights = {None: (torch.randn(HIDDEN, INTER, generator=g) * 0.1, torch.randn(HIDDEN, generator=g))}
    layer = _build(kind, "gptq-act-order-64", 1, 0, monkeypatch, weights)
    # the sorted path: no g_idx, a perm, group g in K rows [64 g, 64 (g + 1))
    assert layer.g_idx is None and layer.perm is not None and layer.perm.dtype == torch.int32
    _unsorted(monkeypatch)
    plain = _build(kind, "gptq-act-order-64", 1, 0, monkeypatch, weights)
    assert plain.perm is None and plain.g_idx is not None
    perm = layer.perm.long()
    assert not torch.equal(perm, torch.arange(perm.numel()))
    assert torch.equal(plain.g_idx.long()[perm], torch.arange(perm.numel()) // 64)
    assert torch.equal(unpack_int4_rows(layer.qweight), unpack_int4_rows(plain.qweight)[perm])
    assert torch.equal(layer.scales, plain.scales) and torch.equal(layer.zeros, plain.zeros)
    # the output: the dequantized reference of the original (unsorted) checkpoint, up to the fp32 order
    k = INTER if kind == "row" else HIDDEN
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(5, k, generator=g).to(dtype)
        bias = None if plain.bias is None else plain.bias.to(dtype)
        ref = int4_linear_ref(x, plain.qweight, plain.scales, plain.zeros, 64, plain.g_idx, bias)
        y = layer.quant_method.apply(layer, x, bias)  # (the layers are fp32: a bf16 x with a bf16 bias)
        assert y.dtype == dtype
        if dtype == torch.float32:
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(y, layer(x), atol=0, rtol=0)
            torch.testing.assert_close(y, plain(x), atol=1e-5, rtol=1e-5)
        else:  # one bf16 rounding of sums in another order
            torch.testing.assert_close(y.float(), ref.float(), atol=2e-2 * ref.abs().max().item(), rtol=1e-2)


def test_act_order_sorting_only_where_exact(monkeypatch):
    from meshserve.layers.quantization.int4 import Int4LinearMethod

    g = torch.Generator().manual_seed(6)
    weights = {None: (torch.randn(HIDDEN, INTER, generator=g) * 0.1, None)}
    # groups of 32 (below the half GEMV's step of 64): g_idx kept, the grouped kernel as before
    small = _build("row", "gptq-act-order", 1, 0, monkeypatch, weights)
    assert small.g_idx is not None and small.perm is None
    # an act-order checkpoint whose g_idx is already plain: nothing to gather, g_idx dropped
    plain_order = _build("row", "gptq-act-order", 1, 0, monkeypatch, weights)
    q = plain_order.qweight
    assert Int4LinearMethod._sort_act_order(plain_order, q, torch.arange(INTER, dtype=torch.int32) // 32,
                                            INTER // 32) == (q, None, None)
    # groups of another size than the layer's (sorted runs of 2 x 64 in a layer of groups of 32) and a rank's
    # slice of groups 2 and 3 of 4 (whole, but not this layer's groups 0 and 1): kept
    for g_idx, groups in ((torch.arange(INTER, dtype=torch.int32) // 64, INTER // 32),
                          (torch.arange(INTER, dtype=torch.int32) // 32 + 2, 2 * INTER // 32)):
        perm_g = g_idx[torch.randperm(INTER, generator=g)]
        got = Int4LinearMethod._sort_act_order(plain_order, q, perm_g, groups)
        assert got[0] is q and got[1] is perm_g and got[2] is None


def test_dummy_act_order_weights_are_sorted_act_order_layers(monkeypatch):
    # dummy weights with a desc_act GPTQ config (bench runs at real sizes): a seeded permutation of the input
    # features kept as perm, the groups taken in its order; the layer still computes x @ W^T (a perm applied on
    # one side only would give unrelated outputs, far outside int4's error)
    as_rank(monkeypatch, 1, 0)
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 64, "desc_act": True}
    config = resolve_quant_config(_Cfg(qc), "gptq", "dummy")
    assert config.online and config.desc_act
    assert not resolve_quant_config(_Cfg({**qc, "quant_method": "awq"}), "awq", "dummy").desc_act
    with quantization_scope(config):
        layer = RowParallelLinear(256, 96)
    w = torch.randn(96, 256, generator=torch.Generator().manual_seed(5))
    layer.weight.data.copy_(w)
    layer.quant_method.process_weights_after_loading(layer)
    perm = layer.perm
    assert layer.g_idx is None and perm is not None
    assert sorted(perm.tolist()) == list(range(256)) and perm.tolist() != list(range(256))
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(6))
    ref = x @ w.T
    err = (layer(x) - ref).norm() / ref.norm()
    # the same weights quantized without act-order: the same error (int4 round-to-nearest of Gaussian weights,
    # ~8%); a permutation missing on either side would make the outputs unrelated (~140%)
    with quantization_scope(resolve_quant_config(_Cfg({**qc, "desc_act": False}), "gptq", "dummy")):
        plain = RowParallelLinear(256, 96)
    plain.weight.data.copy_(w)
    plain.quant_method.process_weights_after_loading(plain)
    assert plain.perm is None
    plain_err = (plain(x) - ref).norm() / ref.norm()
    assert err < 0.15 and plain_err < 0.15 and 0.7 < err / plain_err < 1.4, (err, plain_err)


def test_gate_up_act_forward_only_where_its_gemv_serves(monkeypatch):
    # MergedColumnParallelLinear.act_forward (silu(gate) * up from the batch-1 GEMV's epilogue; the GPU tests
    # run it): None with the switch off, off a GPU, for unequal halves, and for formats without that GEMV
    from dataclasses import replace

    from meshserve.layers.backend_selection import PLAIN

    as_rank(monkeypatch, 1, 0)
    on = replace(PLAIN, gemv=True, gemv_act_out=True)
    x = torch.randn(1, HIDDEN)
    layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
    layer.kernels = on
    assert layer.act_forward(x) is None  # a CPU row: no Triton GEMV
    layer.kernels = replace(on, gemv_act_out=False)
    assert layer.act_forward(x) is None
    uneven = MergedColumnParallelLinear(HIDDEN, [INTER, 2 * INTER])
    uneven.kernels = on
    assert uneven.act_forward(x) is None
    with quantization_scope(Fp8Config()):
        fp8 = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
    fp8.kernels = on
    assert fp8.quantized and fp8.act_forward(x) is None
