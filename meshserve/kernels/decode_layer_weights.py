"""One decoder layer's tensors as the one-launch layer kernel (triton_decode_layer) and its reference
(decode_layer_ref) read them."""

from __future__ import annotations

import torch

from meshserve.kernels.quant_ref import FP8_DTYPE
from meshserve.kernels.triton_decode_layer_int4 import int4_group_fits


class DecodeLayerWeights:
    """One decoder layer's tensors as the kernel reads them (contiguous rows; biases and q/k norms optional).
    A MoE layer (router given): wgu / wd are the experts' w13 [E, 2I, H] (gate rows, then up rows) and w2
    [E, H, I], wr the router [E, H], routing (top k, renormalize, scaling) a softmax top-k's
    (layers/moe_routing.SoftmaxTopK.as_softmax_topk), expert_load the per-expert counter (int64 [E]) or None.
    A dense layer's four projections (wqkv, wo, wgu, wd) may instead be quantized, all four alike: fp8 (e4m3
    [N, K]) with scales their fp32 row scales [N]; or INT4 (quant_ref's internal layout: qweight int32 [K / 8, N])
    with scales and zeros their [K / group_size, N] and group_size 16 times a power of two (int4_group_fits)."""

    __slots__ = ("ln1", "wqkv", "bqkv", "q_norm", "k_norm", "wo", "bo", "ln2", "wgu", "bgu", "wd", "bd", "eps",
                 "qk_eps", "wr", "routing", "expert_load", "scales", "zeros", "group_size")

    def __init__(self, ln1, wqkv, wo, ln2, wgu, wd, eps, *, bqkv=None, q_norm=None, k_norm=None, bo=None,
                 bgu=None, bd=None, qk_eps=None, wr=None, routing=None, expert_load=None, scales=None, zeros=None,
                 group_size=None):
        self.ln1, self.wqkv, self.bqkv, self.wo, self.bo = ln1, wqkv, bqkv, wo, bo
        self.q_norm, self.k_norm, self.ln2, self.wgu, self.bgu, self.wd, self.bd = q_norm, k_norm, ln2, wgu, bgu, wd, bd
        self.eps = float(eps)
        self.qk_eps = float(eps if qk_eps is None else qk_eps)
        self.wr, self.routing, self.expert_load = wr, routing, expert_load
        self.scales = None if scales is None else tuple(scales)
        self.zeros = None if zeros is None else tuple(zeros)
        self.group_size = group_size
        if (wr is None) != (routing is None):
            raise ValueError("DecodeLayerWeights: a MoE layer takes both the router and its routing")
        dtypes = {t.dtype for t in (wqkv, wo, wgu, wd)}
        quantized = dtypes & {FP8_DTYPE, torch.int32}
        if quantized and (len(dtypes) != 1 or self.moe or self.scales is None or len(self.scales) != 4):
            raise ValueError("DecodeLayerWeights: quantized weights are a dense layer's four projections in one "
                             "format, with their four scales")
        if torch.int32 in quantized and (self.zeros is None or len(self.zeros) != 4 or not int4_group_fits(group_size)):
            raise ValueError("DecodeLayerWeights: INT4 weights take their four zeros and a group size of 16 times a "
                             f"power of two, got {group_size}")
        if not quantized and (self.scales is not None or self.zeros is not None):
            raise ValueError("DecodeLayerWeights: scales and zeros belong to quantized weights")

    @property
    def moe(self) -> bool:
        return self.wr is not None

    @property
    def fp8(self) -> bool:
        return self.wqkv.dtype == FP8_DTYPE

    @property
    def int4(self) -> bool:
        return self.wqkv.dtype == torch.int32

    def out_in(self, t: torch.Tensor) -> tuple[int, ...]:
        """(output, input) features of one of the dense projections (INT4 words run [K / 8, N])."""
        return (t.shape[1], t.shape[0] * 8) if self.int4 else tuple(t.shape)
