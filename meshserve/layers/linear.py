"""Linear layers in their tensor-parallel shapes.

Column-parallel layers split the output features across TP ranks; row-parallel layers split the input
features and sum the partial results with one all-reduce. Each parameter carries a `weight_loader` that
copies this rank's slice out of a full checkpoint tensor, so loading never materialises other ranks'
shards. With TP = 1 the slices are the whole tensors.

The weight format is the layer's LinearMethod (layers/quantization/): it creates the tensors (a 16-bit weight,
or fp8 weights and scales, or packed INT4 tensors), each tagged with the axes that run over output and input
features, so the loaders below slice every format alike, and it computes the projection.
"""

import math

import torch
from torch import nn

from meshserve.distributed.parallel_state import get_tp_rank, get_tp_size, tensor_parallel_all_reduce
from meshserve.kernels.fused import fp8_fused_for, gemv_for
from meshserve.layers.backend_selection import PLAIN
from meshserve.layers.quantization import current_linear_method, current_unquantized_method
from meshserve.layers.quantization.base import UnquantizedLinearMethod
from meshserve.layers.weight_utils import full_weight, narrow_weight, weight_shape

_MAX_FUSED_GATED_K = 4096


def _divide(a: int, b: int, what: str) -> int:
    if a % b:
        raise ValueError(f"{what} ({a}) is not divisible by the tensor-parallel size ({b})")
    return a // b


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst <- src, where a per-tensor scalar fills a per-channel slice and [N, 1] fills [N]."""
    dst.copy_(src.reshape(()).expand(dst.shape) if src.numel() == 1 else src.reshape(dst.shape))


def _copy_replicated(param: nn.Parameter, loaded) -> None:
    src = full_weight(loaded).to(param.device)  # the checkpoint's tensor is on the CPU, a GPU model's param is not
    if getattr(param, "same_across_shards", False):  # GPTQ act-order g_idx: merged projections share inputs
        if getattr(param, "loaded_once", False) and not torch.equal(param.data, src.reshape(param.shape)):
            raise ValueError("act-order g_idx differs between the merged projections (q/k/v or gate/up)")
        param.loaded_once = True
    if getattr(param, "reduce_max", False):  # merged shards' per-tensor scales: the largest serves all
        param.data.copy_(torch.maximum(param.data, src.reshape(param.shape).to(param.dtype)))
    else:
        _copy_into(param.data, src)


def _copy_output_slice(param: nn.Parameter, loaded, dst_offset: int, size: int, src_start: int) -> None:
    """param[output features dst_offset : +size] <- loaded[output features src_start : +size], in units of
    features (divided by the tensor's packing along that axis); tensors without an output axis replicate."""
    dim = getattr(param, "output_dim", None)
    if dim is None:
        _copy_replicated(param, loaded)
        return
    pack = getattr(param, "output_pack", 1)
    # (ceil: a block-wise fp8 scale's last block may be partial; other packings divide exactly)
    dst = param.data.narrow(dim, dst_offset // pack, -(-size // pack))
    if math.prod(weight_shape(loaded)) == 1:  # a per-tensor scale of this shard
        _copy_into(dst, full_weight(loaded))
    else:
        _copy_into(dst, narrow_weight(loaded, dim, src_start // pack, -(-size // pack)))


class LinearBase(nn.Module):
    """A linear layer of in_features x out_features per rank, in the format of its LinearMethod (16-bit
    weight [out, in] by default; with the GEMV selected, single 16-bit rows go through the Triton GEMV)."""

    input_is_parallel = False  # row-parallel layers split input features (and so INT4 groups)
    output_is_parallel = False  # column-parallel layers split output features (and so fp8 weight blocks)
    quantizable = True  # False: 16-bit whatever the model's weight format (a quantized copy is dequantized)

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = get_tp_rank(), get_tp_size()
        self.in_features, self.out_features = in_features, out_features
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)
        self.quant_method = current_linear_method() if self.quantizable else current_unquantized_method()
        self.quant_method.create_weights(self, in_features, out_features, torch.get_default_dtype())
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.output_dim = 0
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    @property
    def quantized(self) -> bool:
        return not isinstance(self.quant_method, UnquantizedLinearMethod)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
        _copy_replicated(param, loaded)

    def process_weights_after_loading(self) -> None:
        self.quant_method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x, self.bias)

    def forward_fp8_rows(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """forward of rows its producer already quantized per token (fp8 xq [M, K], fp32 xs [M, 1]), where
        quant_method.takes_fp8_rows said yes."""
        return self.quant_method.apply_fp8_rows(self, xq, xs, out_dtype, self.bias)


class ReplicatedLinear(LinearBase):
    """Every rank holds the whole weight and computes the whole output (an MoE router: never quantized, as
    in quantized checkpoints)."""

    quantizable = False


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks; no communication (the next row-parallel layer reduces)."""

    output_is_parallel = True

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = get_tp_size()
        super().__init__(in_features, _divide(out_features, tp, "output features"), bias)

    def weight_loader(self, param, loaded, shard_id=None):
        size = self.out_features
        _copy_output_slice(param, loaded, 0, size, self.tp_rank * size)


class UnquantizedColumnParallelLinear(ColumnParallelLinear):
    """A column-parallel layer that stays 16-bit whatever the weight format (MLA's kv_b_proj, whose weight the
    attention reads directly); a quantized checkpoint's copy is dequantized at load where the format allows."""

    quantizable = False


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections stored as one (gate and up): one matmul instead of two."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def act_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """silu(gate) * up of this [gate | up] projection from one kernel with SiLU-and-mul in its epilogue (no
        gate/up rows in memory, no SiLU launch; the bits of the projection then the SiLU kernel): the batch-1
        GEMV, or a decode step's rows through the decode GEMM (MESHSERVE_DECODE_GEMM); None where no such path
        applies: the switch is off, the format has none (LinearMethod.apply_act_out: 16-bit weights only), x is
        not one row / a decode step's rows of 16-bit activations on a GPU, or the halves are not equal."""
        if not self.takes_act_out:
            return None
        return self.quant_method.apply_act_out(self, x, self.bias)

    @property
    def takes_act_out(self) -> bool:
        """Whether batch-1 GEMVs of this layer may end in SiLU-and-mul: the switch on and two equal halves."""
        return (self.kernels.gemv_act_out and len(self.output_sizes) == 2
                and self.output_sizes[0] == self.output_sizes[1])

    def weight_loader(self, param, loaded, shard_id: int):
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        size = self.output_sizes[shard_id] // self.tp_size
        _copy_output_slice(param, loaded, offset, size, self.tp_rank * size)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one weight. KV heads are replicated when TP exceeds their count."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = get_tp_size()
        self.head_dim = head_dim
        self.total_num_kv_heads = num_kv_heads
        self.num_heads = _divide(num_heads, tp, "attention heads")
        if num_kv_heads >= tp:
            self.num_kv_heads = _divide(num_kv_heads, tp, "KV heads")
        else:
            _divide(tp, num_kv_heads, "TP size vs KV heads")
            self.num_kv_heads = 1
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp
        super().__init__(hidden_size, out, bias)

    def weight_loader(self, param, loaded, shard_id: str):
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, rank = 0, q_size, self.tp_rank
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            size = kv_size
            # with replicated KV heads (fewer KV heads than ranks), consecutive ranks share one head
            total_kv = self.total_num_kv_heads
            rank = self.tp_rank * total_kv // self.tp_size if total_kv < self.tp_size else self.tp_rank
        _copy_output_slice(param, loaded, offset, size, rank * size)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with one all-reduce."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        tp = get_tp_size()
        super().__init__(_divide(in_features, tp, "input features"), out_features, bias)

    input_is_parallel = True

    def weight_loader(self, param, loaded, shard_id=None):
        if param is self.bias:  # bias is added once, on rank 0's share
            if self.tp_rank == 0:
                param.data.copy_(full_weight(loaded))
            else:
                param.data.zero_()
            return
        dim = getattr(param, "input_dim", None)
        if dim is None:
            _copy_replicated(param, loaded)
            return
        pack = getattr(param, "input_pack", 1)
        size = -(-self.in_features // pack)  # (ceil: see _copy_output_slice)
        _copy_into(param.data, narrow_weight(loaded, dim, self.tp_rank * size, size))

    # reduce=False: this rank's partial sums, for a caller that all-reduces them itself (with the next norm:
    # layers/all_reduce_norm.py)
    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        return _reduced(self.quant_method.apply(self, x, self.bias), reduce)

    def forward_fp8_rows(self, xq: torch.Tensor, xs: torch.Tensor, out_dtype: torch.dtype,
                         reduce: bool = True) -> torch.Tensor:
        return _reduced(super().forward_fp8_rows(xq, xs, out_dtype), reduce)

    def fused_gated_forward(self, gate_up: torch.Tensor, reduce: bool = True) -> torch.Tensor | None:
        """forward(silu(gate) * up) in one GEMV when gate_up is a single 16-bit row on a GPU (batch-1
        decode: the activation never goes to memory); with fp8 weights, SiLU-and-mul writes the fp8 rows
        and their per-token scales in one kernel (kernels/triton_fp8_fused.py); None when neither applies."""
        if self.quantized:
            return self._fp8_gated_forward(gate_up, reduce)
        mod = gemv_for(gate_up, self.weight, self.kernels.gemv)
        # every program of the GEMV re-reads the whole gate/up row from L2 and recomputes SiLU: a win for
        # small MLPs (Qwen3-0.6B, K = 3072: decode 786 -> 804 tok/s on an H100) and a loss for large ones
        # (Llama-3.1-8B, K = 14336: 167 -> 163 tok/s), where the separate SiLU kernel is cheaper
        if mod is None or self.weight.shape[1] > _MAX_FUSED_GATED_K:
            return None
        return _reduced(mod.gemv(gate_up, self.weight, self.bias, gated=True), reduce)

    def _fp8_gated_forward(self, gate_up: torch.Tensor, reduce: bool) -> torch.Tensor | None:
        d = gate_up.shape[-1] // 2
        fused = fp8_fused_for(gate_up, d) if gate_up.dim() == 2 else None
        if fused is None or not self.quant_method.takes_fp8_rows(self, gate_up[:, :d]):  # (a view: its shape)
            return None
        xq, xs = fused.silu_and_mul_quant_fp8(gate_up)
        return self.forward_fp8_rows(xq, xs, gate_up.dtype, reduce)


def _reduced(partial: torch.Tensor, reduce: bool) -> torch.Tensor:
    return tensor_parallel_all_reduce(partial) if reduce else partial
