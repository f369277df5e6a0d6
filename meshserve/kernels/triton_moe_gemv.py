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

Roundings follow kernels/moe_ref.py (gate, up, silu, the product and each slot's down output rounded to the
activation dtype; the weighted slot sum in fp32), so the two differ only by fp32 summation order. An expert
id of -1 (another expert-parallel rank's expert) adds nothing. Shapes depend only on (tokens, top_k), so the
launches capture in CUDA graphs. 16-bit and fp32 weights; fp8 experts stay on triton_moe's pair GEMV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# where this path serves: up to this many (token, slot) pairs, and no more pairs than experts. Past that
# experts repeat across tokens, and each repeat reads the expert again (from L2 at best: the pairs of one
# column tile run side by side), where the grouped GEMM reads it once per BLOCK_M rows. Qwen3-30B-A3B takes
# this path up to batch 8 (64 pairs of 128 experts), DeepSeek-V2-Lite to 10 (60 of 64), Mixtral to 4
MAX_GEMV_PAIRS = 64


def serves(num_tokens: int, pairs: int, num_experts: int) -> bool:
    """Whether the GEMV path takes a call of this shape (16-bit experts)."""
    return num_tokens == 1 or (pairs <= MAX_GEMV_PAIRS and pairs <= num_experts)


@dataclass(frozen=True)
class MoeGemvConfig:
    """Tile shape of the two kernels (tools/bench_moe.py sweeps them)."""

    gate_up_block_n: int = 4  # gate rows per program (and as many up rows)
    gate_up_block_k: int = 512
    down_block_n: int = 4
    down_block_k: int = 1024  # >= width: one load per slot, so the unrolled slots' loads overlap
    num_warps: int = 8


def default_config(hidden: int, width: int) -> MoeGemvConfig:
    """gate_up: 512-wide K tiles over a 2,048 hidden (as the dense GEMV); down: one K tile per slot up to a
    width of 1,024 (Qwen3-30B-A3B's 768), 512-wide tiles past it (DeepSeek-V2-Lite's 1,408: 3 of them, 8% of
    lanes masked instead of 31% at 2,048)."""
    block_k = min(512, triton.next_power_of_2(hidden))
    down_k = triton.next_power_of_2(width) if width <= 1024 else 512
    return MoeGemvConfig(gate_up_block_k=block_k, down_block_k=down_k, num_warps=8 if hidden >= 2048 else 4)


@triton.jit
def _gate_up_gemv_kernel(
    x_ptr,
    w13_ptr,
    ids_ptr,
    inter_ptr,
    width,
    hidden,
    stride_xm,
    stride_we,
    stride_wn,
    stride_im,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pair = tl.program_id(0).to(tl.int64)
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    if expert < 0:  # another rank's expert: down skips this pair, its row is never read
        return
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < width
    ks = tl.arange(0, BLOCK_K)
    x_row = x_ptr + (pair // TOP_K) * stride_xm
    gate_rows = w13_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
    up_rows = gate_rows + width * stride_wn
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        kk = k0 + ks
        kmask = kk < hidden
        wmask = rmask[:, None] & kmask[None, :]
        x = tl.load(x_row + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        acc_gate += tl.load(gate_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32) * x
        acc_up += tl.load(up_rows + kk[None, :], mask=wmask, other=0.0).to(tl.float32) * x
    dt = inter_ptr.dtype.element_ty
    # rounded as the reference rounds F.linear's outputs, F.silu and the product
    gate = tl.sum(acc_gate, 1).to(dt).to(tl.float32)
    up = tl.sum(acc_up, 1).to(dt).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(inter_ptr + pair * stride_im + rows, (act * up).to(dt), mask=rmask)


@triton.jit
def _down_sum_gemv_kernel(
    inter_ptr,
    w2_ptr,
    ids_ptr,
    weights_ptr,
    out_ptr,
    hidden,
    width,
    stride_im,
    stride_we,
    stride_wn,
    stride_om,
    TOP_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < hidden
    ks = tl.arange(0, BLOCK_K)
    dt = out_ptr.dtype.element_ty
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):
        pair = token * TOP_K + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        # a -1 slot (another rank's expert): no column in range, its masked loads fetch nothing, add zero
        limit = tl.where(expert >= 0, width, 0)
        w_rows = w2_ptr + tl.maximum(expert, 0) * stride_we + rows[:, None].to(tl.int64) * stride_wn
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, width, BLOCK_K):
            kk = k0 + ks
            kmask = kk < limit
            h = tl.load(inter_ptr + pair * stride_im + kk, mask=kmask, other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * h[None, :]
        part = tl.sum(acc, 1).to(dt).to(tl.float32)  # the slot's down output, rounded as F.linear's
        y += part * tl.load(weights_ptr + pair)
    tl.store(out_ptr + token * stride_om + rows, y.to(dt), mask=rmask)


def moe_gemv(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    config: MoeGemvConfig | None = None,
) -> torch.Tensor:
    """kernels/moe_ref.fused_experts_ref for 16-bit or fp32 experts: x [T, H]; w13 [E, 2*I, H]; w2 [E, H, I];
    topk_weights [T, K] (float32); topk_ids [T, K] (-1: skip) -> [T, H] in x's dtype."""
    num_tokens, hidden = x.shape
    width, top_k = w2.shape[2], topk_ids.shape[1]
    if num_tokens == 0:
        return x.new_zeros(0, hidden)
    if w13.stride(2) != 1 or w2.stride(2) != 1:
        raise ValueError("moe_gemv needs experts with contiguous rows")
    cfg = config or default_config(hidden, width)
    x = x.contiguous()
    ids = topk_ids.reshape(-1).to(torch.int32).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    inter = x.new_empty(num_tokens * top_k, width)
    out = x.new_empty(num_tokens, hidden)
    _gate_up_gemv_kernel[(ids.numel(), triton.cdiv(width, cfg.gate_up_block_n))](
        x,
        w13,
        ids,
        inter,
        width,
        hidden,
        x.stride(0),
        w13.stride(0),
        w13.stride(1),
        inter.stride(0),
        TOP_K=top_k,
        BLOCK_N=cfg.gate_up_block_n,
        BLOCK_K=cfg.gate_up_block_k,
        num_warps=cfg.num_warps,
        num_stages=3,
    )
    _down_sum_gemv_kernel[(num_tokens, triton.cdiv(hidden, cfg.down_block_n))](
        inter,
        w2,
        ids,
        weights,
        out,
        hidden,
        width,
        inter.stride(0),
        w2.stride(0),
        w2.stride(1),
        out.stride(0),
        TOP_K=top_k,
        BLOCK_N=cfg.down_block_n,
        BLOCK_K=cfg.down_block_k,
        num_warps=cfg.num_warps,
        num_stages=3,
    )
    return out
