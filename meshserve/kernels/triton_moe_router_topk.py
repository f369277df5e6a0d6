"""One token's MoE router GEMV and its softmax top-k routing in one launch (issue 23, opt-in until measured).

At batch 1 a softmax top-k MoE layer (Qwen3-MoE, Mixtral) launches the router's GEMV (E x hidden, 512 KB for
Qwen3-30B-A3B: 32 programs of a few us, latency-bound) and then triton_moe_routing's one-program softmax top-k
(~2.9 us on the H200, 2026-12-03). Here the GEMV's programs each store BLOCK_ROWS logits, rounded to the router
output's dtype as F.linear's are, and take a ticket; the program that draws the last ticket (every logit is stored
then: its ticket's acquire orders the loads after the others' releases) routes the row with triton_moe_routing's
_route_row (same bits as the two launches, given the same logits), counts the load and resets the ticket for the
next launch (CUDA graph replays included). The logits differ from cuBLAS's only by fp32 summation order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_moe_gemv import _rows_times_vector
from meshserve.kernels.triton_moe_routing import _route_row, routing_outputs


@triton.jit
def _router_topk_kernel(
    x_ptr,
    w_ptr,
    logits_ptr,
    ticket_ptr,
    weights_ptr,
    ids_ptr,
    load_ptr,
    num_experts,
    hidden,
    stride_w,
    scaling,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ONE_TILE: tl.constexpr,  # BLOCK_H >= hidden
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    rmask = rows < num_experts
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    dt = logits_ptr.dtype.element_ty
    logits = _rows_times_vector(x_ptr, w_rows, hidden, rmask, hidden, dt, BLOCK_ROWS, BLOCK_H, ONE_TILE)
    tl.store(logits_ptr + rows, logits.to(dt), mask=rmask)
    # (the pattern of triton_attention's inline reduce: every lane's store before the release, the acquire
    # before the last program's loads, which bypass L1: the logits were stored from other SMs)
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == tl.num_programs(0) - 1:  # every program's logits are stored
        tl.debug_barrier()
        top_w, top_i, slots, kmask = _route_row(
            logits_ptr, 0, num_experts, 0, scaling, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K, CG=True
        )
        tl.store(weights_ptr + slots, top_w, mask=kmask)
        tl.store(ids_ptr + slots, top_i, mask=kmask)
        if COUNT:
            tl.atomic_add(load_ptr + top_i, tl.full([BLOCK_K], 1, tl.int64), mask=kmask)
        tl.store(ticket_ptr, 0)  # (the next launch, or replay, starts from zero)


class RouterTopK:
    """A layer's fused router + routing for one token: its logits buffer and its ticket (zeroed once; each launch
    leaves it at zero), reused launch after launch, so the launch captures in a CUDA graph."""

    BLOCK_ROWS = 4

    def __init__(self, num_experts: int, device: torch.device, dtype: torch.dtype):
        self.logits = torch.empty(num_experts, dtype=dtype, device=device)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)

    def __call__(self, x: torch.Tensor, router_weight: torch.Tensor, top_k: int, renormalize: bool,
                 scaling: float = 1.0, expert_load: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [1, H], router_weight [E, H] (rows contiguous) -> (weights [1, K] float32, ids [1, K] int32), as
        softmax_topk(F.linear(x, router_weight), ...); with expert_load (int64 [E]) each chosen expert counted."""
        num_experts, hidden = router_weight.shape
        if x.shape != (1, hidden) or router_weight.stride(1) != 1:
            raise ValueError(f"the fused router takes one row of {hidden} features and contiguous router rows, "
                             f"got {tuple(x.shape)}")
        weights, ids = routing_outputs(1, top_k, num_experts, x.device)
        count = expert_load is not None
        _router_topk_kernel[(triton.cdiv(num_experts, self.BLOCK_ROWS),)](
            x.contiguous(),
            router_weight,
            self.logits,
            self.ticket,
            weights,
            ids,
            expert_load if count else ids,
            num_experts,
            hidden,
            router_weight.stride(0),
            float(scaling),
            TOP_K=top_k,
            RENORMALIZE=renormalize,
            COUNT=count,
            BLOCK_ROWS=self.BLOCK_ROWS,
            BLOCK_H=(block_h := min(512, triton.next_power_of_2(hidden))),
            ONE_TILE=block_h >= hidden,  # (up to 512 features: one load, no loop around it)
            BLOCK_E=triton.next_power_of_2(num_experts),
            BLOCK_K=triton.next_power_of_2(top_k),
            num_warps=4,
        )
        return weights, ids
