"""The routed experts of one MoE layer, in their parallel shapes, and the per-expert load they saw.

Weights are stacked per expert: w13 [experts, 2 * width, hidden] (gate rows, then up rows) and w2 [experts,
hidden, width]. Two layouts over the tensor-parallel group:
  TP (default)        every rank holds every expert, each a 1/TP slice of its width (gate/up column-split,
                      down row-split); partial outputs are summed by the usual all-reduce
  expert parallel     rank r holds experts [r * E/TP, (r + 1) * E/TP) whole; each rank routes a slice of the
                      batch and its tokens go by all-to-all to the ranks holding their experts and back
                      (distributed/expert_parallel.py)
Checkpoints name experts one by one (Mixtral's experts.{e}.w1/w2/w3, Qwen's experts.{e}.gate_proj/up_proj/
down_proj) or stacked (transformers 5's experts.gate_up_proj / experts.down_proj); the weight loader takes
both and reads only this rank's experts and slices. Quantized experts (fp8: layers/quantization/fp8_moe.py) add
scale tensors that the same loader slices, in units of their blocks.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from meshserve.distributed import expert_parallel as ep_comm
from meshserve.distributed.parallel_state import get_parallel_state, tensor_parallel_all_reduce
from meshserve.kernels.moe import (
    folds_shared_mlp,
    fused_experts,
    fused_route_align_block_m,
    route_and_align,
    softmax_topk,
    warmup_token_counts,
)
from meshserve.layers.backend_selection import PLAIN
from meshserve.layers.moe_routing import RoutingFunction
from meshserve.layers.quantization import current_quant_config
from meshserve.layers.quantization.fp8_moe import moe_weight_format
from meshserve.layers.weight_utils import narrow_weight

# checkpoint projection name -> our part: gate (w1), up (w3), down (w2)
EXPERT_PROJECTIONS = {"w1": "gate", "w3": "up", "w2": "down",
                      "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


class FusedMoE(nn.Module):
    """Routed experts: forward(hidden [T, H], router_logits [T, E]) -> [T, H], summed over each token's top-k
    experts with the routing function's weights, already reduced over the TP group."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, routing: RoutingFunction):
        super().__init__()
        self.weight_format = moe_weight_format(current_quant_config())
        st = get_parallel_state()
        self.num_experts, self.routing = num_experts, routing
        # (top_k, renormalize, scaling) when the routing is a plain softmax top-k (one fused launch serves it on
        # the Triton path), else None: fixed by the routing, so resolved here rather than every forward
        self.softmax_topk_args = routing.as_softmax_topk() if hasattr(routing, "as_softmax_topk") else None
        self.tp_size, self.tp_rank = st.tp_size, st.tp_rank
        self.expert_parallel = st.expert_parallel and st.tp_size > 1
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)
        # "all_to_all", or "all_gather" (static shapes: what a CUDA graph capture uses; see expert_parallel.py)
        self.ep_exchange = "all_to_all"
        # experts of a shared MLP that forward may be handed (shared_mlp), set by the model that has one
        # (DeepseekMoE): the warm-up's launch variants count them
        self.foldable_shared_experts = 0
        self._router_topk = None  # forward_with_router's launch state (its logits buffer and ticket), made at first use
        if self.expert_parallel:
            if num_experts % st.tp_size:
                raise ValueError(f"{num_experts} experts do not divide evenly over {st.tp_size} expert-parallel ranks")
            self.num_local_experts = num_experts // st.tp_size
            self.expert_start = st.tp_rank * self.num_local_experts
            self.width, self.width_rank = intermediate_size, 0
        else:
            if intermediate_size % st.tp_size:
                raise ValueError(f"expert width {intermediate_size} is not divisible by the tensor-parallel size "
                                 f"({st.tp_size})")
            self.num_local_experts, self.expert_start = num_experts, 0
            self.width, self.width_rank = intermediate_size // st.tp_size, st.tp_rank
        n, w = self.num_local_experts, self.width
        self.weight_format.check_width(w, st.tp_size, self.expert_parallel)
        dtype = self.weight_format.weight_dtype(torch.get_default_dtype())
        self.w13_weight = nn.Parameter(torch.empty(n, 2 * w, hidden_size, dtype=dtype), requires_grad=False)
        self.w2_weight = nn.Parameter(torch.empty(n, hidden_size, w, dtype=dtype), requires_grad=False)
        self.w13_weight.weight_loader = self.weight_loader
        self.w2_weight.weight_loader = self.weight_loader
        for name, shape in self.weight_format.scale_shapes(n, w, hidden_size).items():
            # NaN until loaded: an expert whose scale the checkpoint lacks is caught after loading
            scale = nn.Parameter(torch.full(shape, math.nan), requires_grad=False)
            # one element per block of 128 rows / features: the loader slices in those units
            scale.rows_per_element, scale.weight_loader = self.weight_format.block[0], self.weight_loader
            self.register_parameter(name, scale)
        # tokens routed to each expert (all experts, by global id) since start, the same on every rank; a
        # buffer, not a parameter: no weight loads it and it is no weight's bytes
        self.register_buffer("expert_load", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    # -- weights -----------------------------------------------------------------------------------------
    def weight_loader(self, param: nn.Parameter, loaded, shard_id: tuple[int | None, str]) -> None:
        """shard_id = (expert id, "gate" | "up" | "down") for one expert's tensor, or (None, "gate_up" |
        "down") for a stacked [experts, ...] tensor."""
        expert, part = shard_id
        unit = getattr(param, "rows_per_element", 1)  # a block scale covers `unit` rows (check_width aligned)
        n, w, start = self.num_local_experts, -(-self.width // unit), self.width_rank * self.width // unit
        if expert is None:  # stacked: this rank's experts, then its slice of each
            if unit != 1:
                raise ValueError("stacked expert scale tensors are not supported (per-expert ones load)")
            local = narrow_weight(loaded, 0, self.expert_start, n)
            if part == "gate_up":
                full = local.shape[1] // 2
                param.data[:, :w].copy_(local[:, start:start + w])
                param.data[:, w:].copy_(local[:, full + start:full + start + w])
            else:
                param.data.copy_(local[:, :, start:start + w])
            return
        local_id = expert - self.expert_start
        if not 0 <= local_id < n:
            return  # another expert-parallel rank's expert
        if part == "down":
            param.data[local_id].copy_(narrow_weight(loaded, 1, start, w))
        else:
            offset = 0 if part == "gate" else w
            param.data[local_id, offset:offset + w].copy_(narrow_weight(loaded, 0, start, w))

    def process_weights_after_loading(self) -> None:
        self.weight_format.process_weights_after_loading(self)

    def expert_weight_bytes_skipped(self) -> int:
        """Bytes of this rank's experts that one token does not read (all but its top_k, at TP)."""
        per_expert = (self.w13_weight[0].numel() + self.w2_weight[0].numel()) * self.w13_weight.element_size()
        return max(0, self.num_local_experts - self.routing.top_k) * per_expert

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, router_logits: torch.Tensor,
                shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """shared_mlp: (gate_up [2 * S * width, hidden], down [hidden, S * width]) of this rank's slice of a
        16-bit shared MLP to add in the experts' launches (only where folds_shared_mlp says it may)."""
        if self.expert_parallel:
            return self._forward_expert_parallel(hidden, router_logits)
        weights, ids, aligned = self._route_aligned(router_logits, hidden, shared_mlp is None)
        return tensor_parallel_all_reduce(self._experts(hidden, weights, ids, shared_mlp, aligned))

    def routes_with_router(self, hidden: torch.Tensor) -> bool:
        """Whether forward_with_router serves this call: MESHSERVE_MOE_ROUTER_FUSED, one token, a softmax top-k
        routing over all experts (not expert parallel), off the legacy path."""
        return (self.kernels.moe_router_fused and hidden.shape[0] == 1 and self.softmax_topk_args is not None
                and not self.expert_parallel and not self.kernels.moe_legacy)

    def forward_with_router(self, hidden: torch.Tensor, router: nn.Module) -> torch.Tensor:
        """forward(hidden, router(hidden)) for one token (routes_with_router), the router's GEMV and the routing
        in one launch on the Triton path (kernels/triton_moe_router_topk.py) where the router is a plain 16-bit
        weight of the hidden's dtype; else exactly forward's path."""
        weight = router.weight
        if not (self.kernels.fused_ops and hidden.is_cuda and weight.dtype == hidden.dtype
                and getattr(router, "bias", None) is None and weight.stride(1) == 1):
            return self.forward(hidden, router(hidden))
        if self._router_topk is None:  # (Triton imported only where a GPU routes)
            if torch.cuda.is_current_stream_capturing():  # its buffers must not come from a graph's private pool
                return self.forward(hidden, router(hidden))  # (the eager warm-ups make them first: 1 token each)
            from meshserve.kernels.triton_moe_router_topk import RouterTopK

            self._router_topk = RouterTopK(weight.shape[0], hidden.device, hidden.dtype)
        weights, ids = self._router_topk(hidden, weight, *self.softmax_topk_args, expert_load=self.expert_load)
        return tensor_parallel_all_reduce(self._experts(hidden, weights, ids))

    def folds_shared_mlp(self, num_tokens: int) -> bool:
        """Whether forward may take a shared MLP for this many tokens: the MoE GEMV's batches on the Triton
        path, or batches up to the moe_fuse_shared switch's bound (kernels/moe.folds_shared_mlp); 16-bit experts,
        not expert parallel (a rank holds only its experts; the shared MLP is TP-split like the experts'
        widths: its partial sums ride along in this layer's one all-reduce)."""
        quantized = bool(self.weight_format.scales(self))
        return not self.expert_parallel and folds_shared_mlp(
            num_tokens, self.routing.top_k, self.num_local_experts, self.kernels.fused_ops, self.kernels.moe_legacy,
            quantized, self.kernels.fuse_shared_tokens)

    def warmup_token_counts(self, max_tokens: int, activation_bytes: int) -> list[int]:
        """Token counts (up to max_tokens) whose steps between them compile every Triton kernel variant this
        layer's experts can launch (kernels/moe.warmup_token_counts); none off the Triton path. Expert
        parallel: the counts of the whole batch (the all-gather exchange's; a dispatch's received rows
        vary)."""
        if not self.kernels.fused_ops:
            return []
        # the fold past one token: the switch's bound, where 16-bit experts without expert parallelism allow it
        shared = self.foldable_shared_experts
        fold_tokens = self.kernels.fuse_shared_tokens if shared and self.folds_shared_mlp(2) else 0
        return warmup_token_counts(max_tokens, self.routing.top_k, self.num_local_experts, shared_experts=shared,
                                   fuse_shared_tokens=min(fold_tokens, max_tokens),
                                   **self._launch_variant(activation_bytes))

    def _launch_variant(self, activation_bytes: int) -> dict:
        """kernels/moe.launch_variant's arguments for this layer (all but the token count and shape)."""
        scales = self.weight_format.scales(self)
        # the one-launch routing + align: a softmax top-k routing over all experts (not expert parallel)
        fused = self.softmax_topk_args is not None and not self.expert_parallel
        return dict(legacy=self.kernels.moe_legacy, table=self.kernels.moe_configs, quantized=bool(scales),
                    blockwise_fp8=scales.get("block") is not None, activation_bytes=activation_bytes,
                    route_align=self.kernels.moe_route_align if fused else "chain")

    def _route_aligned(self, router_logits: torch.Tensor, hidden: torch.Tensor, alone: bool = True):
        """_route's (weights, ids) and, where the one-launch routing + align serves the call
        (MESHSERVE_MOE_ROUTE_ALIGN=fused, decode sizes: kernels/moe.fused_route_align_block_m), the grouped
        GEMM's alignment from the same launch; else None (fused_experts aligns). alone: no shared MLP rides in
        the experts' launches (its pairs would join the alignment)."""
        block_m = None
        if alone and self.kernels.fused_ops and self.kernels.moe_route_align == "fused" and hidden.is_cuda:
            block_m = fused_route_align_block_m(hidden.shape[0], self.routing.top_k, self.num_local_experts,
                                                **self._launch_variant(hidden.element_size()))
        if block_m is None:
            return (*self._route(router_logits), None)
        return route_and_align(router_logits, *self.softmax_topk_args, self.expert_load, block_m)

    def _route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The routing function's (weights, global ids), each chosen expert counted in expert_load: one fused
        launch for a softmax top-k on the Triton path (kernels/triton_moe_routing.py), else the function."""
        if self.softmax_topk_args is not None and self.kernels.fused_ops and not self.kernels.moe_legacy:
            return softmax_topk(router_logits, *self.softmax_topk_args, expert_load=self.expert_load, triton=True)
        weights, ids = self.routing(router_logits)
        self._count(ids)
        return weights, ids

    def _experts(self, x: torch.Tensor, weights: torch.Tensor, local_ids: torch.Tensor,
                 shared_mlp: tuple[torch.Tensor, torch.Tensor] | None = None, aligned: tuple | None = None) -> torch.Tensor:
        shared = {} if shared_mlp is None else {"shared_w13": shared_mlp[0], "shared_w2": shared_mlp[1]}
        return fused_experts(x, self.w13_weight, self.w2_weight, weights, local_ids, triton=self.kernels.fused_ops,
                             legacy=self.kernels.moe_legacy, table=self.kernels.moe_configs, aligned=aligned,
                             **shared, **self.weight_format.scales(self))

    def _count(self, ids: torch.Tensor) -> None:
        flat = ids.reshape(-1).long()
        self.expert_load.scatter_add_(0, flat, torch.ones_like(flat))

    def _local_ids(self, ids: torch.Tensor, rank: int | torch.Tensor) -> torch.Tensor:
        """Global expert ids as ids local to `rank` (a rank per row, or one), -1 where another rank holds them."""
        local = ids - (torch.as_tensor(rank, device=ids.device).reshape(-1, 1) * self.num_local_experts)
        return torch.where((local >= 0) & (local < self.num_local_experts), local, -1).to(torch.int32)

    def _forward_expert_parallel(self, hidden: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        ranks, rank = self.tp_size, self.tp_rank
        sizes = ep_comm.token_slices(hidden.shape[0], ranks)
        begin = sum(sizes[:rank])
        # every rank holds the whole batch and the same router logits: routing it all (a softmax and a top-k
        # over [T, E], small beside the experts) keeps the same load counts on every rank, rank 0's exported
        weights, ids = self._route(router_logits)
        capturing = hidden.is_cuda and torch.cuda.is_current_stream_capturing()
        if self.ep_exchange == "all_gather" or capturing:
            # no dispatch: run this rank's experts on every token and sum the parts
            return tensor_parallel_all_reduce(self._experts(hidden, weights, self._local_ids(ids, rank)))

        end = begin + sizes[rank]
        x, weights, ids = hidden[begin:end], weights[begin:end], ids[begin:end]
        # dispatch: each token once to every rank that holds at least one of its experts, grouped by rank
        owner = ids.long() // self.num_local_experts
        goes_to = torch.zeros(x.shape[0], ranks, dtype=torch.bool, device=x.device)
        goes_to.scatter_(1, owner, True)
        dest, token = goes_to.t().nonzero(as_tuple=True)  # sorted by destination rank, then token
        send_counts = goes_to.sum(0)
        # expert ids local to the destination travel beside the weights, both as float32 (ids < 2**24 exact)
        meta = torch.cat([self._local_ids(ids[token], dest).float(), weights[token].float()], dim=1)
        send, recv = ep_comm.exchange_counts(send_counts)  # the one host sync of the exchange
        recv_x = ep_comm.all_to_all_rows(x[token], send, recv)
        recv_meta = ep_comm.all_to_all_rows(meta, send, recv)
        k = ids.shape[1]
        y = self._experts(recv_x, recv_meta[:, k:], recv_meta[:, :k].to(torch.int32))
        # combine: the weighted partial sums go back to the tokens' ranks, which add them up
        back = ep_comm.all_to_all_rows(y, recv, send)
        out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
        out.index_add_(0, token, back.float())
        return ep_comm.all_gather_rows(out.to(hidden.dtype), sizes)
