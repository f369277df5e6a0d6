"""INT4 group-wise weights from AWQ and GPTQ checkpoints (int4_formats.py describes their packing).

The layer creates the checkpoint's own tensors, so tensor parallelism slices them as stored: column-parallel
layers split the packed output features (8 per int32), row-parallel layers split input features and with them
the groups (the group size must divide each rank's input features). GPTQ act-order (desc_act) groups are
scattered over the input features: row-parallel ranks then keep every group's scales and zeros and slice g_idx.
After loading, both formats are repacked into the one internal layout of kernels/quant_ref.py that the
reference path and the Triton kernel read.

Act-order weights are sorted by group at load where that is exact (as Marlin / ExLlama do): the K rows
reordered by perm = a stable argsort of g_idx, so group g holds rows [g * G, (g + 1) * G) and the layer is a
plain group-wise one (the half GEMV, the dequant-GEMM's group-wise path), x's features permuted by perm at run
time (the GEMV gathers them in its loads). See Int4LinearMethod._sort_act_order for where it applies.

With dummy weights (no checkpoint) the layer takes 16-bit weights and quantizes them round-to-nearest, so
benchmarks at real architecture sizes run the same kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.quant_ops import int4_linear
from meshserve.kernels.quant_ref import (
    int4_group_order,
    pack_int4_rows,
    permute_int4_rows,
    quantize_int4_groups,
)
from meshserve.layers.quantization.base import LinearMethod, QuantConfig, new_param, replace_param
from meshserve.layers.quantization.int4_formats import awq_unpack, gptq_unpack_cols

HALF_STEP = 64  # the half GEMV's K step at 1-2 rows (triton_int4_gemv.default_int4_tiles): it runs groups of
# a multiple of it; smaller act-order groups keep g_idx (the grouped kernel either way)


class Int4Config(QuantConfig):
    """fmt "awq" or "gptq"; group_size -1 means one group per output channel (all input features)."""

    def __init__(
        self, fmt: str, group_size: int, desc_act: bool = False, zero_offset: int = 1, online: bool = False
    ):
        self.name = fmt
        self.group_size = group_size
        self.desc_act = desc_act
        self.zero_offset = zero_offset  # GPTQ v1 stores zero - 1
        self.online = online

    def linear_method(self) -> LinearMethod:
        return Int4LinearMethod(self)

    def describe(self) -> str:
        extra = ", act-order" if self.desc_act else ""
        src = ", round-to-nearest from dummy weights" if self.online else ""
        return f"{self.name} (int4, group size {self.group_size}{extra}{src})"


class Int4LinearMethod(LinearMethod):
    name = "int4"

    def __init__(self, config: Int4Config):
        self.config = config

    def create_weights(self, layer, in_features, out_features, dtype):
        c = self.config
        row_split = getattr(layer, "input_is_parallel", False) and layer.tp_size > 1
        full_in = in_features * layer.tp_size if row_split else in_features
        g = c.group_size if c.group_size > 0 else full_in
        what = f"{c.name} layer with {in_features} input features per rank"
        if in_features % g and not (c.desc_act or c.group_size <= 0):
            raise ValueError(
                f"{what}: the group size {g} does not divide them (tensor parallel splits groups)"
            )
        if full_in % g:
            raise ValueError(f"{what}: the group size {g} does not divide the {full_in} input features")
        if out_features % 8 or in_features % 8:
            raise ValueError(f"{what} and {out_features} output features: int4 packing needs multiples of 8")
        layer.group_size = g
        if c.online:
            new_param(layer, "weight", (out_features, in_features), dtype, output_dim=0, input_dim=1)
            return
        # every group's scales on every rank when groups do not follow the input split
        whole_groups = c.desc_act or c.group_size <= 0
        groups = full_in // g if whole_groups else in_features // g
        group_dim = None if whole_groups else 0
        if c.name == "awq":
            new_param(
                layer,
                "qweight",
                (in_features, out_features // 8),
                torch.int32,
                input_dim=0,
                output_dim=1,
                output_pack=8,
            )
        else:
            new_param(
                layer,
                "qweight",
                (in_features // 8, out_features),
                torch.int32,
                input_dim=0,
                input_pack=8,
                output_dim=1,
            )
            new_param(
                layer,
                "g_idx",
                (in_features,),
                torch.int32,
                input_dim=0,
                optional=not c.desc_act,
                fill=-1,
                same_across_shards=True,
            )
        new_param(
            layer,
            "qzeros",
            (groups, out_features // 8),
            torch.int32,
            input_dim=group_dim,
            input_pack=g,
            output_dim=1,
            output_pack=8,
        )
        new_param(
            layer,
            "scales",
            (groups, out_features),
            torch.float16,
            input_dim=group_dim,
            input_pack=g,
            output_dim=1,
        )

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        c = self.config
        g_idx = perm = None
        if c.online:
            w = layer.weight.data
            if c.desc_act:  # act-order dummy weights as a sorted act-order checkpoint loads: a seeded permutation
                # of the input features, whose groups are taken in its order (the half GEMV's perm path at
                # real sizes; `--hf-overrides` with a quantization_config of desc_act true)
                gen = torch.Generator().manual_seed(w.shape[0] * 65537 + w.shape[1])
                perm = torch.randperm(w.shape[1], generator=gen).to(device=w.device, dtype=torch.int32)
                w = w[:, perm.long()]
            q, scales, zeros = quantize_int4_groups(w, layer.group_size)
            qweight, scales, zeros = pack_int4_rows(q), scales.half(), zeros.half()
            replace_param(layer, "weight", None)
        elif c.name == "awq":
            qweight = pack_int4_rows(awq_unpack(layer.qweight.data))
            zeros = awq_unpack(layer.qzeros.data).half()
            scales = layer.scales.data
        else:
            qweight, scales = layer.qweight.data, layer.scales.data
            zeros = (gptq_unpack_cols(layer.qzeros.data) + c.zero_offset).half()
            g_idx = self._gptq_groups(layer)
            if g_idx is not None:
                qweight, g_idx, perm = self._sort_act_order(layer, qweight, g_idx, scales.shape[0])
            replace_param(layer, "g_idx", g_idx)
        replace_param(layer, "qweight", qweight)
        replace_param(layer, "scales", scales)
        replace_param(layer, "zeros", zeros)
        replace_param(layer, "qzeros", None)
        replace_param(layer, "perm", perm)
        if g_idx is None:
            layer.g_idx = None
        if perm is None:
            layer.perm = None

    @staticmethod
    def _sort_act_order(layer, qweight, g_idx, groups):
        """(qweight, g_idx, perm): act-order weights sorted by group (g_idx None, perm [K] int32) where the
        sorted g_idx is exactly arange(K) // G over this layer's `groups` groups, else as loaded (perm None).
        That holds for every valid act-order checkpoint at TP = 1 and for column-parallel ranks (all input
        features); a row-parallel rank's K slice holds parts of groups, scattered, with every group's scales:
        it keeps g_idx and the grouped kernel. So do groups that are not a multiple of the half GEMV's step (the
        grouped kernel either way), unless the order is already plain (perm the identity: dropped)."""
        perm = int4_group_order(g_idx, layer.group_size, groups)
        if perm is None:
            return qweight, g_idx, None
        if torch.equal(perm, torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)):
            return qweight, None, None
        if layer.group_size % HALF_STEP:
            return qweight, g_idx, None
        return permute_int4_rows(qweight, perm), None, perm

    def _gptq_groups(self, layer) -> torch.Tensor | None:
        """g_idx when act-order scatters groups, None when feature k is in group k // G of this rank."""
        c, loaded = self.config, layer.g_idx.data
        if c.desc_act:
            return loaded
        if c.group_size <= 0 or bool((loaded < 0).all()):  # no g_idx in the checkpoint
            return None
        k = loaded.shape[0]
        first = layer.tp_rank * k if getattr(layer, "input_is_parallel", False) else 0
        expected = (torch.arange(k, device=loaded.device) + first) // layer.group_size
        if not torch.equal(loaded.long(), expected):
            raise ValueError(
                "gptq checkpoint: g_idx permutes the input features but quantization_config has "
                "desc_act false"
            )
        return None

    def apply(self, layer, x, bias):
        return int4_linear(
            x,
            layer.qweight,
            layer.scales,
            layer.zeros,
            layer.group_size,
            layer.g_idx,
            bias,
            fast=layer.kernels.gemv,
            gemv_variant=layer.kernels.int4_gemv,
            perm=layer.perm,
        )
