"""layers/decode_layer.py: a decoder layer through the one-launch layer kernel equals the plain layer.

On CPU DecodeLayerRun.begin never serves (the kernel is a GPU path), so the tests drive DecodeLayerRun.forward
with the kernel in the Triton interpreter (one launch a phase) against real LlamaDecoderLayers (Qwen3's q/k
norms, Qwen2's biases, Llama's plain attention) on the plain path over the Triton attention backend: the
residual stream after every layer and the caches after the step.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoConfig

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.backend_selection import KernelSelection
from meshserve.layers.decode_layer import DecodeLayerRun, _layer_fits, layer_weights
from meshserve.layers.linear import LinearBase
from meshserve.layers.quantization import quantization_scope
from meshserve.layers.quantization.fp8 import Fp8Config
from meshserve.layers.quantization.int4 import Int4Config
from meshserve.layers.rotary import RotaryEmbedding
from meshserve.layers.moe_routing import SoftmaxTopK
from meshserve.models.llama import LlamaDecoderLayer
from meshserve.models.moe import SparseMoeBlock

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="the Triton interpreter runs here only without CUDA")

BLOCK = 16


def _config(model_type: str):
    extra = {"attention_bias": True} if model_type == "qwen2" else {}
    return AutoConfig.for_model(model_type, vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                max_position_embeddings=512, rms_norm_eps=1e-5, **extra)


def _moe_block(top_k: int = 2, renormalize: bool = True):
    """A sparse block of 8 experts of the config's widths (Mixtral's routing by default)."""
    return SparseMoeBlock(64, 8, 48, SoftmaxTopK(top_k, renormalize))


def _layers(model_type: str, seq_len: int, seed: int = 0, moe: tuple[int, bool] | None = None,
            dtype: torch.dtype = torch.float32, quant=None):
    """Two layers with random weights over random caches, and one sequence's decode metadata at seq_len; moe:
    (top k, renormalize) of the second layer's sparse block (the first stays dense: a mixed model); quant: the
    layers' QuantConfig (weights quantized once set, as after loading)."""
    from meshserve.kernels.triton_attention import TritonAttentionBackend

    torch.manual_seed(seed)
    cfg = _config(model_type)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with quantization_scope(quant):
            rotary = RotaryEmbedding(cfg, 16, 512)
            layers = [LlamaDecoderLayer(cfg, rotary, mlp=_moe_block(*moe) if moe and i else None) for i in range(2)]
    finally:
        torch.set_default_dtype(default)
    blocks = -(-seq_len // BLOCK) + 1
    backend = TritonAttentionBackend()
    for layer in layers:
        for name, p in layer.named_parameters():
            with torch.no_grad():
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
        if moe and isinstance(layer.mlp, SparseMoeBlock):  # experts' weights are parameters of their own
            with torch.no_grad():
                for p in (layer.mlp.experts.w13_weight, layer.mlp.experts.w2_weight):
                    p.copy_(0.15 * torch.randn_like(p))
        for module in layer.modules():
            if isinstance(module, LinearBase):
                module.process_weights_after_loading()
        layer.self_attn.attn.backend = backend
        layer.self_attn.attn.kv_cache = torch.randn(2, blocks, BLOCK, 2, 16, dtype=dtype)
    table = torch.arange(1, blocks, dtype=torch.int64)[None]  # block 0 belongs to no one
    last = seq_len - 1
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([int(table[0, last // BLOCK]) * BLOCK + last % BLOCK]),
        query_start_loc=torch.tensor([0, 1]), seq_lens=torch.tensor([seq_len]), block_tables=table,
        max_query_len=1, max_seq_len=seq_len, query_start_loc_cpu=[0, 1], seq_lens_cpu=[seq_len],
    )
    return layers, meta, torch.tensor([last])


@pytest.mark.parametrize(("model_type", "seq_len", "moe"), [
    ("qwen3", 1, None), ("qwen3", 140, None), ("qwen2", 37, None), ("llama", 70, None),
    ("llama", 37, (2, True)),  # Mixtral's routing in the second layer
    ("qwen3", 90, (4, False)),  # Qwen3-MoE's with norm_topk_prob off
])
def test_layer_kernel_equals_the_plain_layers_interp(model_type, seq_len, moe):
    layers, meta, positions = _layers(model_type, seq_len, moe=moe)
    x = torch.randn(1, 64)
    caches = [layer.self_attn.attn.kv_cache.clone() for layer in layers]
    assert all(_layer_fits(layer, torch.float32) for layer in layers)

    hidden, residual, plain = x, None, []
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual, meta)
        plain.append(hidden + residual)  # the whole residual stream after the layer
    plain_caches = [layer.self_attn.attn.kv_cache for layer in layers]

    for layer, cache in zip(layers, caches):
        layer.self_attn.attn.kv_cache = cache
    run = DecodeLayerRun(len(layers), x.device, one_launch=False, programs_per_sm=1, num_warps=4)
    hidden = x
    for layer, expect in zip(layers, plain):
        hidden = run.forward(layer, positions, hidden, meta)
        torch.testing.assert_close(hidden, expect, atol=3e-5, rtol=3e-5)
    for got, expect in zip(caches, plain_caches):
        torch.testing.assert_close(got, expect, atol=3e-5, rtol=3e-5)
    if moe:  # the chosen experts counted as the plain path counts them (/metrics' per-expert load): twice each
        load = layers[1].mlp.experts.expert_load
        assert int(load.sum()) == 2 * moe[0] and bool((load % 2 == 0).all())


def _quantized_layers_run_the_kernel(layers, meta, positions, near_ok):
    """Two quantized fp16 layers through DecodeLayerRun against the plain ops composed with the batch-1 GEMVs'
    weight-only semantics over layer_weights (each projection's scales and zeros its own) and near the plain
    layers (near_ok(kernel's stream, plain layer's stream)); the caches after the step too."""
    from meshserve.kernels.decode_layer_ref import decode_layer_ref

    assert all(_layer_fits(layer, torch.float16) for layer in layers)
    assert not _layer_fits(layers[0], torch.float32)  # quantized weights take a 16-bit row
    x = torch.randn(1, 64, dtype=torch.float16)
    caches = [layer.self_attn.attn.kv_cache.clone() for layer in layers]
    hidden, residual, plain = x, None, []
    for layer in layers:
        hidden, residual = layer(positions, hidden, residual, meta)
        plain.append((hidden.float() + residual.float()).detach())
    ref_caches = [c.clone() for c in caches]
    run = DecodeLayerRun(len(layers), x.device, one_launch=False, programs_per_sm=1, num_warps=4)
    hidden, expect = x, x
    for layer, cache, ref_cache, near in zip(layers, caches, ref_caches, plain):
        attn = layer.self_attn
        expect = decode_layer_ref(expect, layer_weights(layer), positions, attn.rotary_emb.cos_cache,
                                  attn.rotary_emb.sin_cache, ref_cache, meta, attn.attn.scale, 4, 2)
        attn.attn.kv_cache = cache
        hidden = run.forward(layer, positions, hidden, meta)
        torch.testing.assert_close(hidden, expect, atol=2e-2, rtol=2e-2)
        assert near_ok(hidden.float(), near)
    for got, ref in zip(caches, ref_caches):
        torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_fp8_layers_run_the_kernel_with_their_row_scales_interp(model_type):
    """`--quantization fp8` layers (e4m3 weights, a scale a row): the kernel's words path; the plain layers' CPU
    path also quantizes the activations per token, so it stays within ~4% of them."""
    layers, meta, positions = _layers(model_type, 37, dtype=torch.float16, quant=Fp8Config())
    assert all(layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn for layer in layers)
    _quantized_layers_run_the_kernel(layers, meta, positions,
                                     lambda got, near: float((got - near).norm() / near.norm()) < 0.08)


def test_int4_layers_run_the_kernel_with_their_groups_interp():
    """`--quantization awq` layers (dummy weights quantized round-to-nearest at load, groups of 16 here): the
    kernel's INT4 path equals the plain layers too (their CPU path is the same weight-only dequantized product);
    act-order weights take the plain path."""
    layers, meta, positions = _layers("qwen3", 37, dtype=torch.float16, quant=Int4Config("awq", 16, online=True))
    assert all(layer.mlp.down_proj.qweight.dtype == torch.int32 for layer in layers)
    _quantized_layers_run_the_kernel(layers, meta, positions,
                                     lambda got, near: torch.allclose(got, near, atol=3e-2, rtol=3e-2))
    layers[1].mlp.down_proj.perm = torch.arange(96, dtype=torch.int32)
    assert not _layer_fits(layers[1], torch.float16)


def test_a_layer_of_mixed_weight_formats_takes_the_plain_path_interp():
    layers, _, _ = _layers("qwen3", 20, dtype=torch.float16, quant=Fp8Config())
    assert _layer_fits(layers[0], torch.float16)
    layers[0].self_attn.o_proj.weight_scale = torch.nn.Parameter(layers[0].self_attn.o_proj.weight_scale[:, None],
                                                                 requires_grad=False)  # a [N, 1] scale
    assert not _layer_fits(layers[0], torch.float16)
    plain, _, _ = _layers("qwen3", 20, dtype=torch.float16)
    layers[1].mlp = plain[1].mlp  # 16-bit MLP under fp8 attention projections
    assert not _layer_fits(layers[1], torch.float16) and _layer_fits(plain[1], torch.float16)


def test_moe_blocks_the_kernel_does_not_route_take_the_plain_path_interp():
    layers, _, _ = _layers("qwen3", 20, moe=(2, True))
    assert _layer_fits(layers[1], torch.float32)
    layers[1].mlp.shared_expert = torch.nn.Identity()  # Qwen2-MoE's shared expert
    assert not _layer_fits(layers[1], torch.float32)
    layers[1].mlp.shared_expert = None
    layers[1].mlp.experts.softmax_topk_args = None  # grouped / sigmoid routing (DeepSeek-V3's)
    assert not _layer_fits(layers[1], torch.float32)


def test_begin_serves_only_one_row_decode_on_a_gpu_interp():
    layers, meta, _ = _layers("qwen3", 20)
    for layer in layers:
        layer.self_attn.qkv_proj.kernels = KernelSelection(decode_layer=(True, 1, 8, 32))
    assert DecodeLayerRun.begin(torch.randn(1, 64), layers, meta) is None  # a CPU row: the plain path
    layers[1].self_attn.attn.sliding_window = 8
    assert not _layer_fits(layers[1], torch.float32) and _layer_fits(layers[0], torch.float32)
    assert not _layer_fits(layers[0], torch.bfloat16)  # the weights' dtype is the row's
