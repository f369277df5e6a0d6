"""Softmax top-k routing, the expert-load count and the align for the grouped GEMM in ONE launch (issue 23).

At decode the chain (triton_moe_routing's kernel, then triton_moe_align's zero + count + plan + scatter) is
five launches of a few microseconds each, ~17 us of a ~21.5 us layer overhead on the H200 at batch 256 (48
layers: ~0.8 ms a step). Here one program per token does what the routing kernel does (the same
@triton.jit helper: the same bits), then:
  rank      one atomic per chosen expert on counts[E] returns the pair's rank among its expert's pairs
            (the arrival order: the within-expert order triton_moe_align already leaves free)
  prefill   each program writes its slice of the padding (sorted_rows = pairs, block_expert = E - 1), so
            the last program need not
  ticket    a barrier, then one acq_rel atomic on a ticket: the program that draws the last ticket sees
            every other program's counts, ranks and prefill (CUTLASS's semaphore pattern; no program ever
            waits for another, so nothing depends on the programs being resident together)
  plan      the last program: each expert's run padded to BLOCK_M, their starts (a cumsum), the padded
            total, the load counter, each real block's expert, and then every pair's row: its expert's
            start + its rank; it leaves counts and the ticket at zero for the next launch
The outputs are triton_moe_align.align_by_expert's (rows grouped by expert, padded runs, block experts, the
padded total) and triton_moe_routing.softmax_topk's (weights, ids, the load count); only the order of pairs
inside an expert's run may differ, which changes no GEMM row.
Why this shape: a token's routing is ~2 x TOP_K + 3 dependent row reductions (shuffle trees): latency, not
work. One program for the whole call would run them over a [256, 128] tile on one SM, ~64 elements a thread
per pass, several microseconds past the routing launch it replaces; a one-warp program per token (the
routing kernel's shape) keeps every token's chain in parallel, and only the plan is serial: one cumsum over E,
then pairs / SCATTER steps of two loads, a register gather and a store (~1 us per 2,048 pairs), instead of
the chain's four launches and their gaps.
The counts and ticket are a per-device workspace zeroed once: launches on one device must not overlap (one
stream, as the engine runs; CUDA graphs replay them in order). Calls of up to MAX_TOKENS tokens (decode); the
chain serves larger ones, whose plan would serialize too many pairs in one program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels.triton_moe_routing import _route_row

MAX_TOKENS = 512  # decode batches; prefill chunks go through the chain (parallel scatter)
MAX_EXPERTS = 1024  # the workspace's counters
FILL = 64  # padding entries a program writes per step
SCATTER = 1024  # pairs the last program places per step

_workspaces: dict[torch.device, torch.Tensor] = {}


def _workspace(device: torch.device) -> torch.Tensor:
    """int32 [MAX_EXPERTS + 1]: per-expert counts, then the ticket; zero between launches (the last program
    resets them). Made once per device, before any graph capture (the engine's warm-up runs eagerly)."""
    ws = _workspaces.get(device)
    if ws is None:
        ws = _workspaces[device] = torch.zeros(MAX_EXPERTS + 1, dtype=torch.int32, device=device)
    return ws


def serves(num_tokens: int, num_experts: int) -> bool:
    return 0 < num_tokens <= MAX_TOKENS and num_experts <= MAX_EXPERTS


@triton.jit(do_not_specialize=["num_tokens", "num_rows_padded"])  # per-step counts (triton_unified_attention)
def _route_align_kernel(
    logits_ptr, weights_ptr, ids_ptr, load_ptr,
    counts_ptr, ticket_ptr,  # the workspace: zero on entry, zero on exit
    scratch_ptr,  # int32 [pairs]: each pair's rank among its expert's pairs
    sorted_rows_ptr, block_expert_ptr, num_padded_ptr,
    num_tokens, num_experts, num_rows_padded, stride_lm, scaling,
    TOP_K: tl.constexpr, RENORMALIZE: tl.constexpr, COUNT: tl.constexpr,
    BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr,
    FILL: tl.constexpr, SCATTER: tl.constexpr,
):
    pid = tl.program_id(0)
    token = pid.to(tl.int64)
    num_pairs = num_tokens * TOP_K
    top_w, top_i, slots, kmask = _route_row(
        logits_ptr, token, num_experts, stride_lm, scaling, TOP_K, RENORMALIZE, BLOCK_E, BLOCK_K
    )
    tl.store(weights_ptr + token * TOP_K + slots, top_w, mask=kmask)
    tl.store(ids_ptr + token * TOP_K + slots, top_i, mask=kmask)
    rank = tl.atomic_add(counts_ptr + top_i, tl.full([BLOCK_K], 1, tl.int32), mask=kmask, sem="relaxed")
    tl.store(scratch_ptr + token * TOP_K + slots, rank, mask=kmask)
    # this program's slice of the padding; the last program overwrites the real rows and blocks
    num_blocks = num_rows_padded // BLOCK_M
    fill = tl.arange(0, FILL)
    per_row = tl.cdiv(num_rows_padded, num_tokens)
    for r0 in range(pid * per_row, (pid + 1) * per_row, FILL):
        rows = r0 + fill
        tl.store(sorted_rows_ptr + rows, tl.full([FILL], 0, tl.int32) + num_pairs,
                 mask=(rows < (pid + 1) * per_row) & (rows < num_rows_padded))
    per_block = tl.cdiv(num_blocks, num_tokens)
    for b0 in range(pid * per_block, (pid + 1) * per_block, FILL):
        blocks = b0 + fill
        tl.store(block_expert_ptr + blocks, tl.full([FILL], 0, tl.int32) + num_experts - 1,
                 mask=(blocks < (pid + 1) * per_block) & (blocks < num_blocks))
    tl.debug_barrier()  # every lane's stores and atomics before the release below
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel", scope="gpu")
    if ticket == num_tokens - 1:  # the last program: all others' writes are visible (acquire)
        tl.debug_barrier()
        experts = tl.arange(0, BLOCK_E)
        emask = experts < num_experts
        lanes = tl.arange(0, SCATTER)
        # the first pairs' experts and ranks load beside the counts (one L2 round trip for both)
        expert = tl.load(ids_ptr + lanes, mask=lanes < num_pairs, other=0, cache_modifier=".cg")
        pair_rank = tl.load(scratch_ptr + lanes, mask=lanes < num_pairs, other=0, cache_modifier=".cg")
        counts = tl.load(counts_ptr + experts, mask=emask, other=0, cache_modifier=".cg")
        padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        ends = tl.cumsum(padded, 0)
        starts = ends - padded
        tl.store(num_padded_ptr, tl.sum(padded, 0))
        if COUNT:
            load = tl.load(load_ptr + experts, mask=emask, other=0, cache_modifier=".cg")
            tl.store(load_ptr + experts, load + counts.to(tl.int64), mask=emask)
        # each expert's blocks: the j-th of every expert at once (an expert has at most num_tokens pairs)
        blocks_of = padded // BLOCK_M
        for j in range(0, tl.max(blocks_of, 0)):
            tl.store(block_expert_ptr + starts // BLOCK_M + j, experts, mask=emask & (j < blocks_of))
        tl.store(counts_ptr + experts, tl.zeros([BLOCK_E], tl.int32), mask=emask)
        tl.store(ticket_ptr, 0)
        # each pair's row: its expert's start (gathered from registers) + its rank; the next SCATTER pairs
        # load while these are placed
        for p0 in range(0, num_pairs, SCATTER):
            pairs = p0 + lanes
            following = pairs + SCATTER
            next_expert = tl.load(ids_ptr + following, mask=following < num_pairs, other=0, cache_modifier=".cg")
            next_rank = tl.load(scratch_ptr + following, mask=following < num_pairs, other=0,
                                cache_modifier=".cg")
            start = tl.gather(starts, expert, 0)
            tl.store(sorted_rows_ptr + start + pair_rank, pairs, mask=pairs < num_pairs)
            expert, pair_rank = next_expert, next_rank


def route_and_align(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scaling: float,
    expert_load: torch.Tensor | None,
    block_m: int,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """router_logits [T, E] -> (weights [T, K] fp32, ids [T, K] int32, (sorted_rows, block_expert,
    num_padded)): triton_moe_routing.softmax_topk's and then triton_moe_align.align_by_expert(ids, E,
    block_m)'s outputs, in one launch (serves(T, E) calls only)."""
    num_tokens, num_experts = router_logits.shape
    if top_k > num_experts:
        raise ValueError(f"top_k {top_k} > {num_experts} experts")
    if not serves(num_tokens, num_experts):
        raise ValueError(f"{num_tokens} tokens x {num_experts} experts: the chain serves this call")
    device = router_logits.device
    logits = router_logits if router_logits.stride(1) == 1 else router_logits.contiguous()
    pairs = num_tokens * top_k
    rows_padded = triton.cdiv(pairs + num_experts * (block_m - 1), block_m) * block_m
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int32, device=device)
    # one allocation for the align's outputs: sorted rows, block experts, the padded total, each starting on
    # 16 bytes (Triton specializes pointers on it: a per-call alignment would compile again in serving)
    num_blocks = rows_padded // block_m
    blocks_end = rows_padded + triton.cdiv(num_blocks, 4) * 4
    out = torch.empty(blocks_end + 1, dtype=torch.int32, device=device)
    sorted_rows, block_expert, num_padded = (
        out[:rows_padded], out[rows_padded : rows_padded + num_blocks], out[blocks_end:]
    )
    block_e = triton.next_power_of_2(num_experts)
    scratch = torch.empty(pairs, dtype=torch.int32, device=device)
    ws = _workspace(device)
    count = expert_load is not None
    _route_align_kernel[(num_tokens,)](
        logits, weights, ids, expert_load if count else ids,
        ws, ws[MAX_EXPERTS:], scratch,
        sorted_rows, block_expert, num_padded,
        num_tokens, num_experts, rows_padded, logits.stride(0), float(scaling),
        TOP_K=top_k, RENORMALIZE=renormalize, COUNT=count,
        BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k), BLOCK_M=block_m,
        FILL=FILL, SCATTER=SCATTER,
        num_warps=1 if block_e <= 256 else 4,  # the routing kernel's: the same layout, the same bits
    )
    return weights, ids, (sorted_rows, block_expert, num_padded)
