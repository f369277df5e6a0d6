"""Which mixture-of-experts path serves a call: the Triton kernels on a GPU where the backend selection
enabled fused ops, else the torch reference (kernels/moe_ref.py). Same signature, same math.

Triton paths (layers/backend_selection.py's `moe_legacy` picks the first; the second is the GPU default since
its GPU tests passed and tools/bench_moe.py measured it 1.4-2.3x faster per layer on the H200, 2026-11-30;
MESHSERVE_MOE_LEGACY=1 selects the first):
  legacy   triton_moe.fused_experts with its first tile configs and its pair GEMV (torch routing)
  new      batch-1 calls of 16-bit experts (gemv_serves; a 16-bit shared MLP may ride along:
           folds_shared_mlp): triton_moe_gemv, two launches reading only the chosen experts' weights;
           else (and for fp8 experts) triton_moe.fused_experts: Triton align, kernels/moe_configs.py's tuned
           tiles, one combine launch. Routing is one launch (triton_moe_routing) where it is a softmax top-k
  route_align=fused (the default; MESHSERVE_MOE_ROUTE_ALIGN=chain for the five launches): a softmax top-k's
           routing, load count and the grouped GEMM's align in one launch (triton_moe_route_align) for
           decode-sized grouped calls; the chain elsewhere
  fused shared experts (MESHSERVE_MOE_FUSE_SHARED=1, off by default until measured; issue 24): past one token
           too a 16-bit shared MLP rides along, as S more experts of weight one that the align, the grouped
           GEMMs (or the pair GEMV) and the combine handle in their launches (triton_moe._with_shared_pairs),
           read in the MLP's own layout; the reference (off the Triton path) adds the same slices
"""

from __future__ import annotations

import functools

import torch

from meshserve.kernels.moe_configs import stage_configs, use_pair_gemv
from meshserve.kernels.moe_ref import fused_experts_ref, softmax_topk_ref


@functools.cache
def _route_align_module():
    try:
        from meshserve.kernels import triton_moe_route_align
    except ImportError:
        return None
    return triton_moe_route_align


@functools.cache
def _triton_moe():
    try:
        from meshserve.kernels import triton_moe, triton_moe_gemv, triton_moe_routing
    except ImportError:  # no Triton (CPU wheels): the reference serves
        return None
    return triton_moe, triton_moe_gemv, triton_moe_routing


def gemv_serves(num_tokens: int, pairs: int, num_experts: int) -> bool:
    """Whether the MoE GEMV (triton_moe_gemv) takes a call of this shape (16-bit experts, not legacy): one token
    only. Its pairs each read their expert, so an expert picked by two tokens is read twice, where the grouped
    GEMM reads it once per BLOCK_M rows; measured on the H200 (tools/bench_moe.py, experts alone) the GEMV wins
    at 1 token (Qwen3-30B-A3B 32-39 us) and loses at 8 (201 us against the grouped GEMM's 128; DeepSeek-V2-Lite
    230 against 157), so batches of two and more go to the grouped GEMM."""
    del pairs, num_experts  # one token's top-k experts are distinct: no repeats whatever the counts
    return num_tokens == 1


def fused_experts(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    triton: bool = False,
    legacy: bool = False,
    table: str = "tuned",
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    aligned: tuple | None = None,
    **fp8_scales,
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t]) for every token t (ids of -1 skipped);
    fp8_scales: w13_scale, w2_scale and block for fp8 experts (kernels/moe_ref.py). shared_w13 / shared_w2:
    a 16-bit shared MLP added in the same launches, off the legacy path (see folds_shared_mlp). table:
    the grouped GEMM's tile table off the legacy path (kernels/moe_configs.TABLES). aligned: the grouped GEMM's
    alignment of topk_ids, made by route_and_align (used on the grouped path only, never with a shared MLP)."""
    mods = _triton_moe() if triton and x.is_cuda else None
    if mods is None:
        return fused_experts_ref(
            x, w13, w2, topk_weights, topk_ids, shared_w13=shared_w13, shared_w2=shared_w2, **fp8_scales
        )
    grouped, gemv, _ = mods
    on_gemv = (
        not legacy
        and fp8_scales.get("w13_scale") is None
        and gemv_serves(x.shape[0], topk_ids.numel(), w13.shape[0])
    )
    if on_gemv:
        return gemv.moe_gemv(x, w13, w2, topk_weights, topk_ids, shared_w13=shared_w13, shared_w2=shared_w2)
    if legacy:
        if shared_w13 is not None:
            raise ValueError("a shared MLP does not fold into the legacy MoE path (folds_shared_mlp)")
        return grouped.fused_experts(x, w13, w2, topk_weights, topk_ids, configs="legacy", **fp8_scales)
    return grouped.fused_experts(x, w13, w2, topk_weights, topk_ids, configs=table, aligned=aligned,
                                 shared_w13=shared_w13, shared_w2=shared_w2, **fp8_scales)


def launch_variant(
    num_tokens: int,
    top_k: int,
    num_experts: int,
    legacy: bool = False,
    table: str = "tuned",
    quantized: bool = False,
    blockwise_fp8: bool = False,
    activation_bytes: int = 2,
    route_align: str = "chain",
    shared_experts: int = 0,
) -> tuple:
    """Which Triton kernels fused_experts (triton=True) launches for num_tokens tokens, and at which tile
    configs: ("gemv",), ("pair_gemv",), ("grouped", StageConfigs), or ("grouped", StageConfigs, "fused") where
    route_align "fused" (a softmax top-k layer's choice) makes its routing and align one launch
    (fused_route_align_block_m). Calls of one variant meet the same kernel specializations (the grouped GEMM's
    and the align's per-call counts are unspecialized, its unused scale strides fixed), so one call of each
    compiles them all. shared_experts: the S experts of a shared MLP folded in past the GEMV
    (folds_shared_mlp's fuse_shared_tokens): S more pairs a token and S more experts pick the tiles, the
    kernels' HAS_SHARED specialization marks the variant ("shared", S), and the chain routing + align serves
    (the one-launch alignment would miss the shared pairs)."""
    pairs = num_tokens * top_k
    if not legacy and not quantized and gemv_serves(num_tokens, pairs, num_experts):
        return ("gemv",)
    if shared_experts:
        shared = launch_variant(num_tokens, top_k + shared_experts, num_experts + shared_experts, legacy, table,
                                quantized, blockwise_fp8, activation_bytes)
        return (*shared, ("shared", shared_experts))
    if use_pair_gemv(num_tokens, pairs, num_experts):
        return ("pair_gemv",)
    configs = stage_configs("legacy" if legacy else table, pairs, num_experts, quantized, blockwise_fp8,
                            activation_bytes)
    if route_align == "fused" and not legacy:
        module = _route_align_module()
        if module is not None and module.serves(num_tokens, num_experts):
            return ("grouped", configs, "fused")
    return ("grouped", configs)


def fused_route_align_block_m(num_tokens: int, top_k: int, num_experts: int, **variant) -> int | None:
    """The grouped GEMM's BLOCK_M where route_and_align serves this call (launch_variant's "fused"), else None.
    variant: launch_variant's other arguments, route_align among them."""
    choice = launch_variant(num_tokens, top_k, num_experts, **variant)
    return choice[1].gate_up.BLOCK_M if choice[-1] == "fused" else None


@functools.cache
def warmup_token_counts(max_tokens: int, top_k: int, num_experts: int, shared_experts: int = 0,
                        fuse_shared_tokens: int = 0, **variant) -> list[int]:
    """The fewest tokens, in 1..max_tokens, of each launch_variant a call of up to max_tokens tokens can take:
    a warm-up step of each count compiles every MoE kernel variant serving can meet (engine/eager_warmup.py).
    shared_experts: a shared MLP's experts, folded in at up to fuse_shared_tokens tokens (folds_shared_mlp).
    variant: launch_variant's other arguments."""
    first: dict = {}
    for n in range(1, max_tokens + 1):
        shared = shared_experts if n <= fuse_shared_tokens else 0
        first.setdefault(launch_variant(n, top_k, num_experts, shared_experts=shared, **variant), n)
    return sorted(first.values())


def folds_shared_mlp(
    num_tokens: int, top_k: int, num_experts: int, triton: bool, legacy: bool, quantized: bool,
    fuse_shared_tokens: int = 0,
) -> bool:
    """Whether a shared MLP may ride along in fused_experts: 16-bit experts, off the legacy path, where the
    MoE GEMV serves on the Triton path, or at batches of up to fuse_shared_tokens (MESHSERVE_MOE_FUSE_SHARED,
    KernelSelection.fuse_shared_tokens, which folds on the reference path too, so CPU runs check the fold's
    wiring); elsewhere the plain path keeps the separate MLP: the reference stays the model's own structure."""
    if legacy or quantized:
        return False
    return num_tokens <= fuse_shared_tokens or (triton and gemv_serves(num_tokens, num_tokens * top_k, num_experts))


def softmax_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float = 1.0,
    expert_load: torch.Tensor | None = None,
    triton: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax top-k routing (moe_ref.softmax_topk_ref), counting the chosen experts into expert_load."""
    mods = _triton_moe() if triton and router_logits.is_cuda else None
    if mods is None:
        return softmax_topk_ref(router_logits, top_k, renormalize, scaling, expert_load)
    return mods[2].softmax_topk(router_logits, top_k, renormalize, scaling, expert_load)


def route_and_align(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float,
    expert_load: torch.Tensor | None,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple | None]:
    """softmax_topk, and the grouped GEMM's alignment of its ids at block_m, in one launch
    (kernels/triton_moe_route_align.py) on a GPU; (weights, ids, alignment), the alignment None elsewhere
    (fused_experts then aligns the ids itself)."""
    module = _route_align_module() if router_logits.is_cuda else None
    if module is None:
        return (*softmax_topk_ref(router_logits, top_k, renormalize, scaling, expert_load), None)
    return module.route_and_align(router_logits, top_k, renormalize, scaling, expert_load, block_m)
