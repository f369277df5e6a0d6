"""Small-batch mixture-of-experts as two GEMVs that read only the chosen experts' weights (issue 23).

At batch 1 a MoE layer is a weight stream: Qwen3-30B-A3B reads 8 of 128 experts (8 x 9.4 MB per layer),
DeepSeek-V2-Lite 6 of 64. The grouped GEMM (triton_moe.py) first sorts and pads the (token, slot) pairs by
expert (about 30 small torch launches) and runs tl.dot on 16-row blocks holding one real row; here there is
no sort and no padding, and the whole layer is two launches:

  gate_up   grid (pairs, width / BLOCK_N): BLOCK_N gate rows and the matching up rows of the pair's expert,
            streamed along hidden in coalesced [BLOCK_N, BLOCK_K] tiles into 2-D fp32 accumulators (one
            reduction at the end, as kernels/triton_gemv.py), SiLU(gate) * up in the epilogue -> [pairs, width]
  down      grid (tokens, hidden / BLOCK_N): for each of the token's top-k slots (unrolled, so the slots'
            loads are independent and can be in flight together) BLOCK_N rows of that expert's down
            projection, times the routing weight, summed over the slots in fp32 in registers and stored once
            in the activation dtype: no [pairs, hidden] buffer, no atomics, no separate reduce or cast

A shared MLP S experts wide (DeepSeek's shared experts: S * width features, gate rows then up rows, as the
merged gate_up projection holds them) joins as S more width-wide slices per token, weight one: gate_up runs
T * S more programs, down adds S more slots, and the separate MLP's launches and the add are gone. Which
calls take this path: kernels/moe.py (gemv_serves).

Roundings follow kernels/moe_ref.py (gate, up, silu, the product and each slot's down output rounded to the
activation dtype; the weighted slot sum in fp32), so the two differ only by fp32 summation order. An expert
id of -1 (another expert-parallel rank's expert) adds nothing. Shapes depend only on (tokens, top_k), so the
launches capture in CUDA graphs. 16-bit and fp32 weights; fp8 experts stay on triton_moe's pair GEMV.

Under PDL (kernels/pdl.py: decode steps of models the switch covers) both launches, and the routing before them,
start while the launch before still runs: gate_up waits for the routing's ids at once (its weights depend on
them), down loads its experts' tiles first and waits only for gate_up's rows (_down_preloaded), so its weight
stream overlaps gate_up's tail. H200, W1, 2026-12-03 (two processes each): Qwen3-30B-A3B 330.6 tok/s with these
launches plain (MESHSERVE_PDL_MOE=0), 345.3 with PDL (launch), 349.3 with the preload (the default; decode graph
2.99 -> 2.83 ms); DeepSeek-V2-Lite (shared experts: no preload) decode graph 2.78 -> 2.75 ms.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_gemv import gemv_prefetch
from meshserve.kernels.triton_ops import silu_mul


@dataclass(frozen=True)
class MoeGemvConfig:
    """Tile shape of the two kernels (tools/bench_moe.py sweeps them)."""

    gate_up_block_n: int = 4  # gate rows per program (and as many up rows)
    gate_up_block_k: int = 512
    down_block_n: int = 4
    down_block_k: int = 1024  # >= width: one load per slot, so the unrolled slots' loads overlap
    num_warps: int = 8
    down_one_tile: bool = True  # where down_block_k >= width: each slot's tile loaded outside any loop


def default_config(hidden: int, width: int) -> MoeGemvConfig:
    """Experts up to 1,024 wide (Qwen3-30B-A3B's 768): 256-wide K tiles on 4 warps for gate_up, one output row
    per down program with one K tile per slot (tools/bench_moe.py --gemv-sweep-only on the H200, 2026-12-03: the
    experts at 1 token 27.4 us against 38.6 with the wider experts' tiles below, the default for all before; W1 Qwen3-30B-A3B 330.9 against 280.8 tok/s, of
    which the gate_up tile 280.8 -> 317.8-320.8 and the down kernel's one row 320.8 -> 330.9: 2,048 programs
    instead of 512 keep more of the slots' loads in flight). Wider experts (DeepSeek-V2-
    Lite's 1,408, with its shared MLP folded in): gate_up 512-wide K tiles over a 2,048 hidden (as the dense GEMV)
    on 8 warps, down 512-wide tiles (3 of them over 1,408: 8% of lanes masked instead of 31% at 2,048); the
    sweep's best there (256-wide on 2 warps, experts alone 5% faster) ran W1 8% slower with the shared MLP.
    MESHSERVE_MOE_GEMV_TILE="gate_up_n,gate_up_k,down_n,down_k,warps[,down_one_tile 0|1]" overrides it for A/Bs."""
    spec = os.environ.get("MESHSERVE_MOE_GEMV_TILE", "")
    if spec:
        values = spec.split(",")
        try:
            if len(values) not in (5, 6):
                raise ValueError
            return MoeGemvConfig(*(int(v) for v in values[:5]), *(bool(int(v)) for v in values[5:]))
        except ValueError:
            raise ValueError(
                f"MESHSERVE_MOE_GEMV_TILE={spec!r}: expected gate_up_n,gate_up_k,down_n,down_k,warps[,down_one_tile]"
            ) from None
    if width <= 1024:
        return MoeGemvConfig(4, min(256, triton.next_power_of_2(hidden)), 1, triton.next_power_of_2(width), 4)
    block_k = min(512, triton.next_power_of_2(hidden))
    return MoeGemvConfig(gate_up_block_k=block_k, down_block_k=512, num_warps=8 if hidden >= 2048 else 4)


@triton.jit(do_not_specialize=["num_pairs"])  # per-step counts (triton_unified_attention)
def _gate_up_gemv_kernel(
    x_ptr,
    w13_ptr,
    shared_w13_ptr,  # [2 * NUM_SHARED * width, hidden] (gate rows, then up rows) when NUM_SHARED > 0
    ids_ptr,
    inter_ptr,
    width,
    hidden,
    num_pairs,
    stride_xm,
    stride_we,
    stride_wn,
    stride_swn,
    stride_im,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr = False,
    USE_GDC: tl.constexpr = False,
):
    pair = tl.program_id(0).to(tl.int64)  # a routed pair, or past num_pairs a token's shared expert
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # the ids are the routing launch's output (the wait before any exit below: the down launch after this one
    # reads them before its own wait, on the strength of every program here having waited)
    gdc_wait(USE_GDC)
    if NUM_SHARED > 0:
        is_shared = pair >= num_pairs
        expert = tl.load(ids_ptr + tl.minimum(pair, num_pairs - 1)).to(tl.int64)
        if (expert < 0) & (pair < num_pairs):  # another rank's expert: down skips this pair
            return
        shared = pair - num_pairs  # token * NUM_SHARED + j: the j-th width-wide slice of the shared MLP
        token = tl.where(is_shared, shared // NUM_SHARED, pair // TOP_K)
        first_row = tl.where(is_shared, (shared % NUM_SHARED) * width, 0)
        row_stride = tl.where(is_shared, stride_swn, stride_wn)
        base = tl.where(is_shared, shared_w13_ptr, w13_ptr + expert * stride_we)
        up_offset = tl.where(is_shared, NUM_SHARED * width, width) * row_stride
    else:
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        if expert < 0:  # another rank's expert: down skips this pair, its row is never read
            return
        token, first_row, row_stride = pair // TOP_K, 0, stride_wn
        base, up_offset = w13_ptr + expert * stride_we, width * stride_wn
    rmask = rows < width
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + token * stride_xm
    gate_rows = base + (first_row + rows[:, None]).to(tl.int64) * row_stride
    up_rows = gate_rows + up_offset
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PREFETCH:  # the next K tile's gate and up rows load before this tile's math (same sums, same order)
        wmask = rmask[:, None] & (ks < hidden)[None, :]
        gate_next = tl.load(gate_rows + ks[None, :], mask=wmask, other=0.0)
        up_next = tl.load(up_rows + ks[None, :], mask=wmask, other=0.0)
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + ks
            kmask = kk < hidden
            gate_w, up_w = gate_next, up_next
            kn = kk + BLOCK_K  # past hidden on the last trip: masked off, nothing read
            nmask = rmask[:, None] & (kn < hidden)[None, :]
            gate_next = tl.load(gate_rows + kn[None, :], mask=nmask, other=0.0)
            up_next = tl.load(up_rows + kn[None, :], mask=nmask, other=0.0)
            x = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
            acc_gate += gate_w.to(tl.float32) * x
            acc_up += up_w.to(tl.float32) * x
    else:
        for k0 in range(0, hidden, BLOCK_K):
            kk = k0 + ks
            kmask = kk < hidden
            wmask = rmask[:, None] & kmask[None, :]
            x = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
            acc_gate += tl.load(gate_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32) * x
            acc_up += tl.load(up_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32) * x
    gdc_trigger_late(USE_GDC)
    dt = inter_ptr.dtype.element_ty
    # rounded as the reference rounds F.linear's outputs, F.silu and the product
    gate = tl.sum(acc_gate, 1).to(dt).to(tl.float32)
    up = tl.sum(acc_up, 1).to(dt).to(tl.float32)
    tl.store(inter_ptr + pair * stride_im + rows, silu_mul(gate, up, dt), mask=rmask)


@triton.jit
def _rows_times_vector(inter_row, w_rows, limit, rmask, width, dt, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       ONE_TILE: tl.constexpr):
    """BLOCK_N rows (w_rows) times the vector at inter_row over `width` columns (those past `limit` masked off),
    rounded as F.linear's (to dt): one slot's down output here, the router's logits in triton_moe_router_topk.
    ONE_TILE (BLOCK_K >= width): the row in one load with no loop around it, so the caller's unrolled slots
    are straight-line code whose loads need not wait for the slot before (a loop of one trip over a runtime
    width is still a loop the scheduler does not move loads across)."""
    ks = tl.arange(0, BLOCK_K)
    if ONE_TILE:
        kmask = ks < limit
        h = tl.load(inter_row + ks, mask=kmask, other=0.0).to(tl.float32)
        w = tl.load(w_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        acc = w.to(tl.float32) * h[None, :]
    else:
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            kk = k0 + ks
            kmask = kk < limit
            h = tl.load(inter_row + kk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * h[None, :]
    return tl.sum(acc, 1).to(dt).to(tl.float32)


@triton.jit
def _down_preloaded(inter_ptr, w2_ptr, ids_ptr, weights_ptr, token, rows, rmask, width, stride_im, stride_we,
                    stride_wn, dt, TOP_K: tl.constexpr, SLOTS: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, USE_GDC: tl.constexpr):
    """The down projection of one token's routed slots with their weight tiles loaded BEFORE the PDL wait, so
    the stream of this launch's weights overlaps the gate_up launch's tail (one tile per slot: width <=
    BLOCK_K). The ids and routing weights come from the routing launch two back: this grid starts only once
    every gate_up program has passed its own wait on that launch (gate_up waits before any exit), so they are
    complete; .cg reads them from L2, past an L1 line a previous replay may have left. Slots in one [S, N, K]
    tile: each slot's row sum rounded to dt as the plain loop's, the weighted slot sum in fp32 (another order:
    a few output ulps from the plain kernel)."""
    slots = tl.arange(0, SLOTS)  # TOP_K padded to a power of two
    smask = slots < TOP_K
    pairs = token * TOP_K + slots
    expert = tl.load(ids_ptr + pairs, mask=smask, other=-1, cache_modifier=".cg").to(tl.int64)
    route_w = tl.load(weights_ptr + pairs, mask=smask, other=0.0, cache_modifier=".cg")
    live = expert >= 0  # a -1 slot (another rank's expert) reads nothing and adds zero
    ks = tl.arange(0, BLOCK_K)
    kmask = ks < width
    w = tl.load(
        w2_ptr + tl.maximum(expert, 0)[:, None, None] * stride_we + rows[None, :, None].to(tl.int64) * stride_wn
        + ks[None, None, :],
        mask=live[:, None, None] & rmask[None, :, None] & kmask[None, None, :],
        other=0.0,
    )
    gdc_wait(USE_GDC)  # the intermediate rows are the gate_up launch's output
    h = tl.load(inter_ptr + pairs[:, None] * stride_im + ks[None, :], mask=live[:, None] & kmask[None, :], other=0.0)
    gdc_trigger_late(USE_GDC)
    part = tl.sum(w.to(tl.float32) * h.to(tl.float32)[:, None, :], 2).to(dt).to(tl.float32)  # [S, N]
    return tl.sum(part * route_w[:, None], 0)


@triton.jit(do_not_specialize=["num_pairs"])  # per-step counts (triton_unified_attention)
def _down_sum_gemv_kernel(
    inter_ptr,
    w2_ptr,
    shared_w2_ptr,  # [hidden, NUM_SHARED * width] when NUM_SHARED > 0
    ids_ptr,
    weights_ptr,
    out_ptr,
    hidden,
    width,
    num_pairs,
    stride_im,
    stride_we,
    stride_wn,
    stride_swn,
    stride_om,
    TOP_K: tl.constexpr,
    NUM_SHARED: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ONE_TILE: tl.constexpr = False,
    PRELOAD: tl.constexpr = False,
    SLOTS: tl.constexpr = 1,
    USE_GDC: tl.constexpr = False,
):
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < hidden
    dt = out_ptr.dtype.element_ty
    if PRELOAD:  # (one tile per slot, no shared MLP: moe_gemv's rule)
        y = _down_preloaded(inter_ptr, w2_ptr, ids_ptr, weights_ptr, token, rows, rmask, width, stride_im,
                            stride_we, stride_wn, dt, TOP_K, SLOTS, BLOCK_N, BLOCK_K, USE_GDC)
    else:
        gdc_wait(USE_GDC)  # the ids, routing weights and intermediate rows: earlier launches' outputs
        y = tl.zeros([BLOCK_N], dtype=tl.float32)
        for slot in tl.static_range(TOP_K):
            pair = token * TOP_K + slot
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            # a -1 slot (another rank's expert): no column in range, its masked loads fetch nothing, add zero
            limit = tl.where(expert >= 0, width, 0)
            w_rows = w2_ptr + tl.maximum(expert, 0) * stride_we + rows[:, None].to(tl.int64) * stride_wn
            part = _rows_times_vector(inter_ptr + pair * stride_im, w_rows, limit, rmask, width, dt, BLOCK_N,
                                      BLOCK_K, ONE_TILE)
            y += part * tl.load(weights_ptr + pair)
        for j in tl.static_range(NUM_SHARED):  # the shared MLP's slices, weight one
            w_rows = shared_w2_ptr + j * width + rows[:, None].to(tl.int64) * stride_swn
            inter_row = inter_ptr + (num_pairs + token * NUM_SHARED + j) * stride_im
            y += _rows_times_vector(inter_row, w_rows, width, rmask, width, dt, BLOCK_N, BLOCK_K, ONE_TILE)
        gdc_trigger_late(USE_GDC)
    tl.store(out_ptr + token * stride_om + rows, y.to(dt), mask=rmask)


def moe_gemv(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeGemvConfig | None = None,
    shared_w13: torch.Tensor | None = None,
    shared_w2: torch.Tensor | None = None,
    pdl: bool | None = None,
) -> torch.Tensor:
    """kernels/moe_ref.fused_experts_ref for 16-bit or fp32 experts: x [T, H]; w13 [E, 2*I, H]; w2 [E, H, I];
    topk_weights [T, K] (float32); topk_ids [T, K] (-1: skip) -> [T, H] in x's dtype. With shared_w13
    [2*S*I, H] and shared_w2 [H, S*I] (a shared MLP S experts wide) its output is added, in the same launches.
    pdl: both launches with PDL (kernels/pdl.py), None the process switch (and PdlPolicy.moe); the down launch
    then preloads its experts' tiles where one tile holds a slot's row and no shared MLP rides along."""
    num_tokens, hidden = x.shape
    width, top_k = w2.shape[2], topk_ids.shape[1]
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    num_shared = 0 if shared_w13 is None else shared_w2.shape[1] // width
    if shared_w13 is not None and (
        shared_w2.shape[1] != num_shared * width or shared_w13.shape[0] != 2 * num_shared * width
    ):
        raise ValueError(
            f"shared MLP of {shared_w2.shape[1]} features is no whole number of {width}-wide experts"
        )
    if any(w.stride(-1) != 1 for w in (w13, w2) + ((shared_w13, shared_w2) if num_shared else ())):
        raise ValueError("moe_gemv needs experts with contiguous rows")
    cfg = config or default_config(hidden, width)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    pairs = ids.numel()
    inter = x.new_empty(pairs + num_tokens * num_shared, width)
    out = x.new_empty(num_tokens, hidden)
    sw13, sw2 = (shared_w13, shared_w2) if num_shared else (w13, w2)  # (never read without shared experts)
    one_tile = cfg.down_one_tile and cfg.down_block_k >= width
    policy = pdl_mod.policy()
    want = pdl if pdl is not None or policy.moe != "off" else False
    gdc = pdl_mod.gdc_kwargs(x, want)
    # the preloaded layout where PDL launches it (in the interpreter: where the switch is on, so CPU tests run it)
    preload = (one_tile and num_shared == 0 and policy.moe == "preload" and policy.preload != "none"
               and (bool(gdc["USE_GDC"]) if x.is_cuda and not pdl_mod.interpreting() else pdl_mod.resolve(want)))
    _gate_up_gemv_kernel[(inter.shape[0], triton.cdiv(width, cfg.gate_up_block_n))](
        x,
        w13,
        sw13,
        ids,
        inter,
        width,
        hidden,
        pairs,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        sw13.stride(-2),
        inter.stride(0),
        TOP_K=top_k,
        NUM_SHARED=num_shared,
        BLOCK_N=cfg.gate_up_block_n,
        BLOCK_K=cfg.gate_up_block_k,
        PREFETCH=gemv_prefetch("moe"),
        num_warps=cfg.num_warps,
        num_stages=3,
        **gdc,
    )
    _down_sum_gemv_kernel[(num_tokens, triton.cdiv(hidden, cfg.down_block_n))](
        inter,
        w2,
        sw2,
        ids,
        weights,
        out,
        hidden,
        width,
        pairs,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        sw2.stride(-2),
        out.stride(0),
        TOP_K=top_k,
        NUM_SHARED=num_shared,
        BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k,
        ONE_TILE=one_tile,
        PRELOAD=preload,
        SLOTS=triton.next_power_of_2(top_k),
        num_warps=cfg.num_warps,
        num_stages=3,
        **gdc,
    )
    return out
