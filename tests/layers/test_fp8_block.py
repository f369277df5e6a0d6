"""Block-wise FP8 as a linear layer's format (layers/quantization/fp8_block.py): resolving it from the checkpoint's
quantization_config, the one-line errors, and tensor-parallel slicing of weight_scale_inv with the weight (each
rank's layer built with the rank patched in; the ranks' outputs must concatenate (column-parallel) or sum
(row-parallel) to the one-device output, and the one-device output must be the checkpoint's projection)."""

from __future__ import annotations

import pytest
import torch

from meshserve.errors import InvalidArgumentError
from meshserve.kernels.fp8_block_ref import dequantize_fp8_blockwise, quantize_fp8_blockwise
from meshserve.layers.linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedColumnParallelLinear,
)
from meshserve.layers.quantization import check_quant_shapes, quantization_scope, resolve_quant_config
from meshserve.layers.quantization.fp8 import Fp8Config
from meshserve.layers.quantization.fp8_block import Fp8BlockConfig
from meshserve.models.quant_config import check_weight_format
from tests.layers.tp_ranks import as_rank, one_device_columns

BLOCK_FP8 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}


class _Cfg:
    def __init__(self, qc=None, **fields):
        if qc is not None:
            self.quantization_config = qc
        self.__dict__.update(fields)


def test_resolved_from_the_checkpoint_and_bad_variants_are_one_line_errors():
    config = resolve_quant_config(_Cfg(BLOCK_FP8), None)
    assert isinstance(config, Fp8BlockConfig) and config.block == (128, 128) and not config.online
    assert isinstance(resolve_quant_config(_Cfg(BLOCK_FP8), "fp8"), Fp8BlockConfig)
    # --quantization fp8 on a 16-bit checkpoint stays per-channel online fp8
    online = resolve_quant_config(_Cfg(), "fp8")
    assert isinstance(online, Fp8Config) and online.online
    # dummy weights at a block-fp8 config are quantized block-wise at load
    assert resolve_quant_config(_Cfg(BLOCK_FP8), None, "dummy").online
    with pytest.raises(InvalidArgumentError, match=r"weight_block_size \[64, 64\] is not supported"):
        resolve_quant_config(_Cfg({**BLOCK_FP8, "weight_block_size": [64, 64]}), None)
    with pytest.raises(InvalidArgumentError, match="activation_scheme static is not supported"):
        resolve_quant_config(_Cfg({**BLOCK_FP8, "activation_scheme": "static"}), None)
    with pytest.raises(InvalidArgumentError, match="fmt e5m2 is not supported"):
        resolve_quant_config(_Cfg({**BLOCK_FP8, "fmt": "e5m2"}), None)
    with pytest.raises(InvalidArgumentError, match=r"leaves layers unquantized \(model.layers.0.mlp"):
        resolve_quant_config(
            _Cfg({**BLOCK_FP8, "modules_to_not_convert": ["lm_head", "model.layers.0.mlp"]}), None
        )
    # the torch-free argument check lets 128 x 128 through and names other block sizes
    check_weight_format(BLOCK_FP8, "m", "auto")
    with pytest.raises(
        Exception, match=r"fp8 \(64x128 block scales\) quantized checkpoints are not supported"
    ):
        check_weight_format({**BLOCK_FP8, "weight_block_size": [64, 128]}, "m", "auto")


def test_tensor_parallel_split_of_a_block_is_refused_before_loading():
    hf = _Cfg(
        hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=3072
    )
    config = Fp8BlockConfig()
    check_quant_shapes(config, hf, 2)  # k/v: 128 rows per rank
    check_quant_shapes(config, hf, 4)  # 2 KV heads over 4 ranks: replicated, a whole 128-row head each
    hf.head_dim = 64  # k/v 128 rows in all: 64 per rank at TP 2
    with pytest.raises(InvalidArgumentError, match="q/k/v: a shard of 64 output features per rank"):
        check_quant_shapes(config, hf, 2)
    hf.head_dim, hf.intermediate_size = 128, 1408  # 704 per rank
    with pytest.raises(InvalidArgumentError, match=r"gate/up: a shard of 704 output features per rank"):
        check_quant_shapes(config, hf, 2)


# ----------------------------------------------------------------------------------------------------------
# tensor-parallel slicing
# ----------------------------------------------------------------------------------------------------------
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER = 320, 4, 2, 128, 512  # hidden 320: partial blocks on K (and N)


def _build(kind: str, tp: int, rank: int, monkeypatch, weights, config=None):
    as_rank(monkeypatch, tp, rank)
    with quantization_scope(config or Fp8BlockConfig()):
        if kind == "qkv":
            layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, bias=True)
        elif kind == "merged":
            layer = MergedColumnParallelLinear(HIDDEN, [INTER, INTER])
        else:
            layer = RowParallelLinear(INTER, HIDDEN, bias=True)
    params = dict(layer.named_parameters())
    with torch.no_grad():
        for shard, (w, b) in weights.items():
            extra = [] if shard is None else [shard]
            wq, scale_inv = quantize_fp8_blockwise(w)
            params["weight"].weight_loader(params["weight"], wq, *extra)
            params["weight_scale_inv"].weight_loader(params["weight_scale_inv"], scale_inv, *extra)
            if b is not None:
                params["bias"].weight_loader(params["bias"], b, *extra)
        layer.process_weights_after_loading()
    return layer


@pytest.mark.parametrize("kind", ["qkv", "merged", "row"])
def test_tensor_parallel_slices_block_scales(kind, monkeypatch):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):  # rows of different sizes: every block gets its own scale
        return torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g)

    if kind == "qkv":
        weights = {
            "q": (rand(HEADS * HEAD_DIM, HIDDEN), rand(HEADS * HEAD_DIM, 1)[:, 0]),
            "k": (rand(KV_HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM, 1)[:, 0]),
            "v": (rand(KV_HEADS * HEAD_DIM, HIDDEN), rand(KV_HEADS * HEAD_DIM, 1)[:, 0]),
        }
    elif kind == "merged":
        weights = {0: (rand(INTER, HIDDEN), None), 1: (rand(INTER, HIDDEN), None)}
    else:
        weights = {None: (rand(HIDDEN, INTER), rand(HIDDEN, 1)[:, 0])}
    x = torch.randn(3, INTER if kind == "row" else HIDDEN, generator=g)
    full = _build(kind, 1, 0, monkeypatch, weights)
    assert full.weight.dtype == torch.float8_e4m3fn
    # the one-device layer holds each projection's blocks in order and computes its dequantized projection
    want_scales = torch.cat([quantize_fp8_blockwise(w)[1] for w, _ in weights.values()])
    assert torch.equal(full.weight_scale_inv, want_scales)
    deq = torch.cat([dequantize_fp8_blockwise(*quantize_fp8_blockwise(w)) for w, _ in weights.values()])
    bias = torch.cat([b if b is not None else torch.zeros(w.shape[0]) for w, b in weights.values()])
    exact = x @ deq.t() + bias
    out = full(x)
    assert (out - exact).norm() / exact.norm() < 0.05  # only the activations' fp8 rounding
    ranks = [_build(kind, 2, r, monkeypatch, weights) for r in range(2)]
    if kind == "row":
        assert ranks[1].weight_scale_inv.shape == (3, 2)  # 320 rows -> 3 blocks; 256 inputs per rank -> 2
        x_parts = x.chunk(2, dim=-1)
        # each rank's 128-feature groups are the one-device groups: the same quantized activations
        torch.testing.assert_close(ranks[0](x_parts[0]) + ranks[1](x_parts[1]), out, atol=1e-4, rtol=1e-4)
        return
    outs = [layer(x) for layer in ranks]
    combined = one_device_columns(kind, outs, HEADS * HEAD_DIM // 2, KV_HEADS * HEAD_DIM // 2)
    torch.testing.assert_close(combined, out, atol=1e-5, rtol=1e-5)


def test_layers_that_would_split_a_block_are_refused(monkeypatch):
    as_rank(monkeypatch, 2, 0)
    with quantization_scope(Fp8BlockConfig()):
        with pytest.raises(
            ValueError, match=r"RowParallelLinear: 160 input features per rank .* split a 128x128"
        ):
            RowParallelLinear(320, 256)
        with pytest.raises(ValueError, match=r"shard of 64 output features per rank at tensor parallel 2"):
            QKVParallelLinear(256, 64, 4, 2)  # k: 128 rows, 64 per rank
        with pytest.raises(ValueError, match=r"shard of 192 output features per rank"):
            MergedColumnParallelLinear(256, [384, 384])
        ReplicatedLinear(256, 8, bias=False)  # (an MoE router: not split, any size)
    as_rank(monkeypatch, 1, 0)
    with quantization_scope(Fp8BlockConfig()):
        with pytest.raises(ValueError, match=r"shard of 96 output features in one merged projection"):
            MergedColumnParallelLinear(256, [96, 96])
        MergedColumnParallelLinear(256, [128, 96])  # the last shard may end mid-block, as the checkpoint's


def test_sixteen_bit_layers_dequantize_a_quantized_copy_at_load(monkeypatch):
    """kv_b_proj (and replicated layers) stay 16-bit: an fp8 checkpoint copy is dequantized once, with its
    scales; a 16-bit copy (no weight_scale_inv) loads as is."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 160, generator=g)
    wq, scale_inv = quantize_fp8_blockwise(w)
    for tp, rank in ((1, 0), (2, 1)):
        as_rank(monkeypatch, tp, rank)
        with quantization_scope(Fp8BlockConfig()):
            layer = UnquantizedColumnParallelLinear(160, 256)
        assert not layer.quantized
        with torch.no_grad():
            layer.weight.weight_loader(layer.weight, wq)
            layer.weight_scale_inv.weight_loader(layer.weight_scale_inv, scale_inv)
            layer.process_weights_after_loading()
        rows = slice(rank * 128, (rank + 1) * 128) if tp == 2 else slice(None)
        assert layer.weight.dtype == torch.float32 and not hasattr(layer, "weight_scale_inv")
        assert torch.equal(layer.weight, dequantize_fp8_blockwise(wq, scale_inv)[rows])
    as_rank(monkeypatch, 1, 0)
    with quantization_scope(Fp8BlockConfig()):
        router = ReplicatedLinear(160, 8, bias=False)
    with torch.no_grad():
        router.weight.weight_loader(router.weight, w[:8])
        router.process_weights_after_loading()
    assert torch.equal(router.weight, w[:8])
