"""Batch-1 decode with each decoder layer in one persistent launch (MESHSERVE_DECODE_LAYER, opt-in).

kernels/triton_decode_layer.py runs a Llama-family layer (RMSNorm, QKV, q/k norm + rotary + KV write, attention,
o_proj + residual, RMSNorm, gate/up, SiLU-and-mul, down + residual) as phases of one grid with barriers
between them. Its projections are 16-bit, fp8 with a scale a row (`--quantization fp8` and per-channel fp8
checkpoints: the words GEMV's products) or group-wise INT4 (AWQ, GPTQ without act-order, `--quantization awq`
dummy weights: the half INT4 GEMV's products), the quantized ones in bf16 / fp16 models. A sparse layer of
Mixtral or Qwen2/3-MoE (softmax top-k routing, no shared expert) runs its router's phase and the chosen experts'
rows in place of the MLP's. The hidden state between layers is then the whole residual stream, as with the norm
fold (layers/norm_fold.py): the residual is None coming in and going out, and the model's final norm runs alone.

Where it does not apply, begin returns None and the layers run their usual path: more than one row or more
than one sequence, a step with prompt tokens, not on a GPU, tensor parallelism or pipeline stages (the model's
check), other quantized projections (block-wise fp8, act-order INT4, or a mix of formats in a layer), layers
whose attention or MLP is not Llama's own, a sliding window, an attention backend other than Triton's, weights
that are not contiguous rows, or MoE layers the kernel does not route (expert parallel, quantized experts or
attention projections, a shared expert, grouped or sigmoid routing).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from meshserve.distributed.parallel_state import get_tp_size
from meshserve.kernels.attention_metadata import AttentionMetadata


@functools.cache
def _kernels():
    from meshserve.kernels import triton_decode_layer

    return triton_decode_layer


def _rows(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.stride(1) == 1 and t.stride(0) == t.shape[1]


def _moe_fits(mlp: nn.Module, dtype: torch.dtype) -> bool:
    """A sparse MoE block the kernel routes: softmax top-k over all experts, 16-bit experts of the row's dtype,
    no shared expert, not expert parallel, a plain router."""
    from meshserve.models.moe import SparseMoeBlock

    if not isinstance(mlp, SparseMoeBlock) or mlp.shared_expert is not None:
        return False
    experts, router = mlp.experts, mlp.gate
    return (experts.softmax_topk_args is not None and not experts.expert_parallel
            and not experts.weight_format.scales(experts) and experts.w13_weight.dtype == dtype
            and experts.w2_weight.dtype == dtype and experts.w13_weight.is_contiguous()
            and experts.w2_weight.is_contiguous() and not router.quantized and router.bias is None
            and router.weight.dtype == dtype and _rows(router.weight))


def _plain(lin: nn.Module, dtype: torch.dtype) -> bool:
    return not lin.quantized and lin.weight.dtype == dtype and _rows(lin.weight)


def _fp8_rows(lin: nn.Module, dtype: torch.dtype) -> bool:
    """fp8 weights with a scale a row (layers/quantization/fp8.py), as the kernel's words read them, under a 16-bit
    row (the batch-1 GEMV's weight-only semantics)."""
    from meshserve.kernels.quant_ref import FP8_DTYPE
    from meshserve.layers.quantization.fp8 import Fp8LinearMethod

    if not isinstance(lin.quant_method, Fp8LinearMethod) or dtype not in (torch.bfloat16, torch.float16):
        return False
    w, s = lin.weight, lin.weight_scale
    return (w.dtype == FP8_DTYPE and _rows(w) and w.shape[1] % 4 == 0 and s.dtype == torch.float32
            and s.shape == (w.shape[0],) and s.is_contiguous())


def _int4_groups(lin: nn.Module, dtype: torch.dtype) -> int | None:
    """The group size of group-wise INT4 weights without act-order (layers/quantization/int4.py's internal
    layout: qweight [K / 8, N], scales / zeros [K / G, N]) under a 16-bit row, in groups the kernel takes
    (int4_group_fits), else None."""
    from meshserve.kernels.triton_decode_layer_int4 import int4_group_fits
    from meshserve.layers.quantization.int4 import Int4LinearMethod

    if not isinstance(lin.quant_method, Int4LinearMethod) or dtype not in (torch.bfloat16, torch.float16):
        return None
    q, s, z, g = lin.qweight, lin.scales, lin.zeros, lin.group_size
    if (lin.g_idx is not None or lin.perm is not None or not int4_group_fits(g) or q.dtype != torch.int32
            or not q.is_contiguous()):
        return None
    groups = (q.shape[0] * 8 // g, q.shape[1])
    return g if s.shape == groups and z.shape == groups and s.is_contiguous() and z.is_contiguous() else None


def _layer_fits(layer: nn.Module, dtype: torch.dtype) -> bool:
    from meshserve.kernels.triton_attention import TritonAttentionBackend

    if not getattr(layer, "folds_attn_norm", False):
        return False
    attn, mlp = layer.self_attn, layer.mlp
    if getattr(layer, "folds_mlp_norm", False):
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        groups = {_int4_groups(lin, dtype) for lin in linears}
        fits = (all(_plain(lin, dtype) for lin in linears) or all(_fp8_rows(lin, dtype) for lin in linears)
                or (len(groups) == 1 and None not in groups))
    elif _moe_fits(mlp, dtype):
        fits = all(_plain(lin, dtype) for lin in (attn.qkv_proj, attn.o_proj))
    else:
        return False
    cache_layer = attn.attn
    return (
        fits
        and cache_layer.kv_cache is not None
        and cache_layer.sliding_window is None
        and isinstance(cache_layer.backend, TritonAttentionBackend)
    )


def layer_weights(layer: nn.Module):
    """The kernel's view of one LlamaDecoderLayer's tensors (a sparse one's experts, router and load counter)."""
    from meshserve.kernels.decode_layer_weights import DecodeLayerWeights

    attn, mlp = layer.self_attn, layer.mlp
    common = dict(bqkv=attn.qkv_proj.bias, q_norm=None if attn.q_norm is None else attn.q_norm.weight,
                  k_norm=None if attn.k_norm is None else attn.k_norm.weight, bo=attn.o_proj.bias,
                  qk_eps=None if attn.q_norm is None else attn.q_norm.eps)
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    if not getattr(layer, "folds_mlp_norm", False):  # a sparse MoE block (_moe_fits)
        experts = mlp.experts
        return DecodeLayerWeights(
            norms[0].weight, attn.qkv_proj.weight, attn.o_proj.weight, norms[1].weight, experts.w13_weight,
            experts.w2_weight, norms[0].eps, wr=mlp.gate.weight, routing=experts.softmax_topk_args,
            expert_load=experts.expert_load, **common,
        )
    linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if hasattr(attn.qkv_proj, "qweight"):  # INT4 (_int4_groups)
        weights = [lin.qweight for lin in linears]
        quant = dict(scales=[lin.scales for lin in linears], zeros=[lin.zeros for lin in linears],
                     group_size=attn.qkv_proj.group_size)
    else:  # 16-bit, or fp8 with row scales (_fp8_rows)
        weights = [lin.weight for lin in linears]
        quant = dict(scales=[lin.weight_scale for lin in linears]) if attn.qkv_proj.quantized else {}
    return DecodeLayerWeights(
        norms[0].weight, weights[0], weights[1], norms[1].weight, weights[2], weights[3], norms[0].eps,
        bgu=mlp.gate_up_proj.bias, bd=mlp.down_proj.bias, **quant, **common,
    )


class DecodeLayerRun:
    """One batch-1 decode step through the layer kernel: its barrier counters (zeroed once a step, inside the
    decode graph when captured) and the launch shape."""

    def __init__(self, num_layers: int, device: torch.device, one_launch: bool, programs_per_sm: int,
                 num_warps: int, stream_values: int = 32):
        self.barriers = torch.zeros(num_layers, _kernels().BARRIERS_PER_LAYER, dtype=torch.int32, device=device)
        self.one_launch, self.programs_per_sm, self.num_warps = one_launch, programs_per_sm, num_warps
        self.stream_values = stream_values
        self.index = 0

    @classmethod
    def begin(cls, hidden: torch.Tensor, layers, meta: AttentionMetadata) -> DecodeLayerRun | None:
        """The run for this step's layers, or None where the kernel does not apply (see the module docstring)."""
        if len(layers) == 0 or not getattr(layers[0], "folds_attn_norm", False):
            return None
        choice = layers[0].self_attn.qkv_proj.kernels.decode_layer  # the switch first: cheap
        if choice is None or not hidden.is_cuda or hidden.numel() != hidden.shape[-1] or get_tp_size() > 1:
            return None
        if meta.max_query_len != 1 or meta.seq_lens.shape[0] != 1 or meta.graph_bound:
            return None
        if hidden.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return None
        if not all(_layer_fits(layer, hidden.dtype) for layer in layers):
            return None
        return cls(len(layers), hidden.device, *choice)

    def forward(self, layer: nn.Module, positions: torch.Tensor, hidden: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """The layer's output residual stream from its input one (both [1, hidden])."""
        attn = layer.self_attn
        cache_layer = attn.attn
        out = _kernels().decode_layer(
            hidden, layer_weights(layer), positions, attn.rotary_emb.cos_cache, attn.rotary_emb.sin_cache,
            cache_layer.kv_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, cache_layer.scale,
            attn.num_heads, attn.num_kv_heads, self.barriers[self.index], cache_layer.k_scale, cache_layer.v_scale,
            programs_per_sm=self.programs_per_sm, num_warps=self.num_warps, one_launch=self.one_launch,
            stream_values=self.stream_values, fp8_path=cache_layer.backend._fp8_path_for(grid_tile=False),
        )
        self.index += 1
        if cache_layer.after_kv_write is not None:  # K/V were written inside the launch
            cache_layer.after_kv_write()
        return out
