"""Softmax top-k routing in one launch (issue 23): kernels/moe_ref.softmax_topk_ref's math.

The torch routing of a MoE layer is about nine small launches (cast, softmax, topk, sum, divide, id cast, and
the per-expert load count's cast, ones and scatter_add); at batch 1 each is longer than the math. One program
per token takes its row of E logits (E <= a few hundred: one tile), softmax in fp32, picks the top k by k
argmax passes (ties to the lower id, as torch.topk in practice), renormalizes and scales the k weights, and
adds the chosen experts to the load counter with atomics. Qwen2/3-MoE and Mixtral (SoftmaxTopK) and
DeepSeek-V2's greedy routing (GroupedTopK with one group) are this function; grouped, sigmoid or
bias-corrected routing stays on torch (layers/moe_routing.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait


@triton.jit
def _route_row(
    logits_ptr, token, num_experts, stride_lm, scaling,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr,
    CG: tl.constexpr = False,
):
    """One token's (weights [BLOCK_K] fp32, ids [BLOCK_K] int32, slots, valid slots): shared with
    triton_moe_route_align's and triton_moe_router_topk's kernels, so the launches give the same bits. CG: the
    logits were stored by other programs of the same launch (loaded past this SM's L1)."""
    offs = tl.arange(0, BLOCK_E)
    emask = offs < num_experts
    ptrs = logits_ptr + token * stride_lm + offs
    if CG:
        logits = tl.load(ptrs, mask=emask, other=float("-inf"), cache_modifier=".cg").to(tl.float32)
    else:
        logits = tl.load(ptrs, mask=emask, other=float("-inf")).to(tl.float32)
    e = tl.exp(logits - tl.max(logits, 0))
    probs = e / tl.sum(e, 0)
    probs = tl.where(emask, probs, -1.0)  # padding lanes below every probability: never picked
    slots = tl.arange(0, BLOCK_K)
    top_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    top_i = tl.zeros([BLOCK_K], dtype=tl.int32)
    for k in tl.static_range(TOP_K):
        best = tl.max(probs, 0)
        idx = tl.min(tl.where(probs == best, offs, BLOCK_E), 0)  # the lowest id among equals
        top_w = tl.where(slots == k, best, top_w)
        top_i = tl.where(slots == k, idx, top_i)
        probs = tl.where(offs == idx, -1.0, probs)
    kmask = slots < TOP_K
    if RENORMALIZE:
        top_w = top_w / tl.sum(tl.where(kmask, top_w, 0.0), 0)
    return top_w * scaling, top_i, slots, kmask


@triton.jit
def _softmax_topk_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    load_ptr,
    num_experts,
    stride_lm,
    scaling,
    TOP_K: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    COUNT: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_GDC: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    gdc_wait(USE_GDC)  # the logits are the router GEMV's output
    top_w, top_i, slots, kmask = _route_row(
        logits_ptr, token, num_experts, stride_lm, scaling, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K
    )
    gdc_trigger_late(USE_GDC)
    tl.store(weights_ptr + token * TOP_K + slots, top_w, mask=kmask)
    tl.store(ids_ptr + token * TOP_K + slots, top_i, mask=kmask)
    if COUNT:
        tl.atomic_add(load_ptr + top_i, tl.full([BLOCK_K], 1, tl.int64), mask=kmask)


def routing_outputs(num_tokens: int, top_k: int, num_experts: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The routing's (weights [T, K] float32, ids [T, K] int32) to fill; a top_k past the experts refused."""
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} > {num_experts} experts")
    return (torch.empty(num_tokens, top_k, dtype=torch.float32, device=device),
            torch.empty(num_tokens, top_k, dtype=torch.int32, device=device))


def softmax_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float = 1.0,
    expert_load: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, K] float32, ids [T, K] int32), as softmax_topk_ref; with
    expert_load (int64 [E]) each chosen expert's count goes up by one. Launched with PDL where the process
    switch says so (kernels/pdl.py; PdlPolicy.moe)."""
    num_tokens, num_experts = router_logits.shape
    weights, ids = routing_outputs(num_tokens, top_k, num_experts, router_logits.device)
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    if num_tokens == 0:
        return weights, ids
    count = expert_load is not None
    block_e = triton.next_power_of_2(num_experts)
    _softmax_topk_kernel[(num_tokens,)](
        logits,
        weights,
        ids,
        expert_load if count else ids,
        num_experts,
        logits.stride(0),
        float(scaling),
        TOP_K=top_k,
        RENORMALIZE=renormalize,
        COUNT=count,
        BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=1 if block_e <= 256 else 4,
        **pdl_mod.gdc_kwargs(logits, None if pdl_mod.policy().moe != "off" else False),
    )
    return weights, ids
