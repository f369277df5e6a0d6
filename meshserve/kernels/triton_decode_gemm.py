"""Triton GEMMs for decode-sized batches (a few to a few hundred rows): y[M, N] = x[M, K] . w[N, K]^T, fp32
accumulation, out in 16 bits, in two formats:
* fp8_rowwise_gemm: fp8 x and w with per-token activation scales and per-channel weight scales, torch._scaled_mm's
  rowwise contract, (xq . wq^T) * xs[M] * ws[N] (+ bias). Reference: quant_ref.fp8_linear_ref after the
  quantization (the same products and scales).
* gemm_16bit: bf16 / fp16 x and w (+ bias), F.linear's contract.

Why: at W2's batches cuBLAS ran the projections far from both roofs. fp8 (H200, twenty-seventh session): the 8B's
gate_up at 1.07 PFLOP/s and 2.1 TB/s of weights, down 0.73 PFLOP/s, 1.4 TB/s (~17 us its larger floor, 41 us
taken), 3.7 ms of a ~9.4 ms step: the small-N projections are 64-96 output tiles of 128 x 128 on 132 SMs. 16-bit
(twenty-fourth session): Qwen3-0.6B's 112 projections a step took 5-8 us each where their bytes take 1-3, ~0.8 ms
of a W2 step whatever the batch, and cuBLAS kernels break the PDL chain the small models' decode kernels form.
Here:
* tiles come from decode_tile(m, n, k, format) or are given (tools/bench_decode_gemm.py times them on the device);
* SPLIT_K > 1 cuts K so a small-N projection fills the GPU: each split stores its fp32 partial tile, and the
  split that draws the tile's last ticket sums them in split order (.cg loads: other SMs wrote them; the same
  bits whichever split is last), finishes and resets the ticket (kernels/tickets.py);
* programs walk output tiles GROUP_M row-tiles at a time per weight column tile (the weight stays in L2 while
  the row-tiles that need it run);
* under PDL (kernels/pdl.py) a launch waits for its producer only before its first load and lets its consumer
  launch early: no gap in a chain of Triton decode kernels.
The fp8 kernel serves fp8-weight steps of 2-16 rows by default (MESHSERVE_FP8_GEMM=auto; =triton for every row
count), the 16-bit one is opt-in (MESHSERVE_DECODE_GEMM=1; layers/backend_selection.py). Measured alone on an H200
(tools/bench_decode_gemm.py, BENCHMARKS.md thirty-ninth session) the fp8 kernel beats _scaled_mm 1.4-1.9x at 16
rows at the 8B's projections, is mixed at 128 (down 1.2x faster, qkv and gate_up slower) and loses at 256 and 512
(W2 decodes at ~256); end to end the 8B's fp8 decode at 2-16 rows ran +31-38% (H200) and +24-26% (H100) over
_scaled_mm (fifty-third session). The 16-bit one loses to F.linear at Qwen3-0.6B's projections and LM head at
every row count measured (16-512; ties at the 16-row down projection).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from meshserve.kernels.pdl import gdc_kwargs
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.tickets import MAX_TICKETS, ticket_workspace, tickets_usable
from meshserve.kernels.triton_ops import silu_mul

MAX_ROWS_16BIT = 512  # gemm_16bit's rows: decode steps; a prefill's larger GEMMs stay cuBLAS's (decode_gemm_for)


@triton.jit(do_not_specialize=["M"])  # per-step row counts (triton_unified_attention)
def _decode_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, ws_ptr, ticket_ptr,
    M, N, K, up_offset,
    stride_am, stride_bn, stride_cm,
    SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
    ACT_GATED: tl.constexpr = False, USE_GDC: tl.constexpr = False,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    # grouped order: GROUP_M row-tiles in turn for each weight column tile
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_rows = a_ptr + rm[:, None].to(tl.int64) * stride_am
    b_cols = b_ptr + rn[None, :].to(tl.int64) * stride_bn  # w [N, K] read as its transpose [K, N]
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    kt0 = split * per_split
    kt1 = tl.minimum(kt0 + per_split, k_tiles)
    gdc_wait(USE_GDC)  # x comes from the previous kernel
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # ACT_GATED: the up half's columns (rows N + rn of w)
    up_cols = b_cols + up_offset  # (elements: N rows of w, from the host)
    for kt in range(kt0, kt1):
        kk = kt * BLOCK_K + rk
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=n_mask[None, :], other=0.0)
            if ACT_GATED:
                b_up = tl.load(up_cols + kk[:, None], mask=n_mask[None, :], other=0.0)
        else:
            k_mask = kk < K
            a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            if ACT_GATED:
                b_up = tl.load(up_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        # fp8 (SCALED): the tensor cores' fp8 accumulator keeps ~14 bits (sm_90), and Triton leaves it there for the
        # whole K by default; promoting to fp32 once a K tile (BLOCK_K, as cuBLAS every 4 wgmmas of 32) keeps the
        # sums within bf16's rounding of _scaled_mm's (the GPU test caught 3-ulp differences without it)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K if SCALED else None)
        if ACT_GATED:
            acc_up = tl.dot(a, b_up, acc_up, out_dtype=tl.float32, max_num_imprecise_acc=BLOCK_K if SCALED else None)
    gdc_trigger_late(USE_GDC)
    if ACT_GATED:  # (SPLIT_K 1: the host's rule) silu(gate) * up, rounded as the unfused pair rounds
        dt = c_ptr.dtype.element_ty
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            acc_up += tl.load(bias_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y = silu_mul(acc.to(dt).to(tl.float32), acc_up.to(dt).to(tl.float32), dt)
        tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y, mask=m_mask[:, None] & n_mask[None, :])
    elif SPLIT_K == 1:
        _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, SCALED, HAS_BIAS)
    else:
        tile = pid_m * num_n + pid_n
        r = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        ws_tile = ws_ptr + tile.to(tl.int64) * (SPLIT_K * BLOCK_M * BLOCK_N)
        tl.store(ws_tile + split * (BLOCK_M * BLOCK_N) + r, acc)
        tl.debug_barrier()  # every lane's partial stored before the release below
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT_K - 1:  # the tile's last split: every partial is visible (acquire)
            tl.debug_barrier()
            # summed in split order whichever split is last (the same bits every run), into the one
            # accumulator: its own partial is in the workspace already
            acc = tl.load(ws_tile + r, cache_modifier=".cg")
            for s in range(1, SPLIT_K):
                acc += tl.load(ws_tile + s * (BLOCK_M * BLOCK_N) + r, cache_modifier=".cg")
            _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, SCALED, HAS_BIAS)
            tl.store(ticket_ptr + tile, 0)


@triton.jit
def _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, SCALED: tl.constexpr,
              HAS_BIAS: tl.constexpr):
    """The rowwise scales (fp8) and the bias on the fp32 sum, then the 16-bit store: _scaled_mm's order."""
    if SCALED:
        xs = tl.load(as_ptr + rm, mask=m_mask, other=0.0)
        ws = tl.load(bs_ptr + rn, mask=n_mask, other=0.0)
        acc = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: only the split heuristic reads it
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


def decode_tile(m: int, n: int, k: int, num_sms: int, elem_bytes: int = 1,
                act_gated: bool = False) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for an [m, k] x [k, n] launch of elem_bytes
    operands (1: fp8, 2: 16-bit): a first guess by M bucket (not measured yet: tools/bench_decode_gemm.py), K
    steps of 128 bytes, then K split while the output tiles fill less than one wave, each split keeping at least
    8 K steps. act_gated (two accumulators, no split): at most 128 columns a tile."""
    if m <= 64:
        bm, bn, warps, stages = 64, 64, 4, 5
    elif m <= 128:
        bm, bn, warps, stages = 64, 128, 4, 4
    elif m <= 256 or act_gated:
        bm, bn, warps, stages = 128, 128, 8, 4
    else:
        bm, bn, warps, stages = 128, 256, 8, 3
    bk = 128 // elem_bytes
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split * 2 <= num_sms and triton.cdiv(k, bk) // (split * 2) >= 8:
        split *= 2
    return bm, bn, bk, split, warps, stages


def _launch(x, x_scale, weight, weight_scale, bias, out_dtype, tile, act_gated: bool = False) -> torch.Tensor:
    m, k = x.shape
    n = weight.shape[0] // 2 if act_gated else weight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=x.device)
    if not m:
        return y
    if x.stride(1) != 1:
        x = x.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bm, bn, bk, split, warps, stages = tile or decode_tile(
        m, n, k, _num_sms(x.device.index if x.is_cuda else None), x.element_size(), act_gated)
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    # no split where no tickets can be had (kernels/tickets.py) or with the gated epilogue (two accumulators)
    if split > 1 and (act_gated or tiles > MAX_TICKETS or not tickets_usable(x.device)):
        split = 1
    ws = torch.empty((tiles, split, bm, bn) if split > 1 else (1,), dtype=torch.float32, device=x.device)
    tickets = ticket_workspace(x.device) if split > 1 else ws
    scaled = x_scale is not None
    _decode_gemm_kernel[(tiles, split)](
        x, x_scale.reshape(-1).float().contiguous() if scaled else y, weight,
        weight_scale.reshape(-1).float().contiguous() if scaled else y,
        bias if bias is not None else y, y, ws, tickets,
        m, n, k, n * weight.stride(0) if act_gated else 0,
        x.stride(0), weight.stride(0), y.stride(0),
        SCALED=scaled, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8,
        EVEN_K=k % bk == 0, ACT_GATED=act_gated, num_warps=warps, num_stages=stages,
        **gdc_kwargs(x, programs=tiles * split, num_warps=warps),
    )
    return y


def fp8_rowwise_gemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype,
                     tile: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """xq [M, K] fp8 with xs [M, 1] (or [M]) fp32, weight [N, K] fp8 with weight_scale [N] -> [M, N] in out_dtype
    (torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale[None, :]) + bias). tile: decode_tile's
    six values, None: decode_tile's choice."""
    return _launch(xq, xs, weight, weight_scale, bias, out_dtype, tile)


def gemm_16bit(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               tile: tuple[int, int, int, int, int, int] | None = None, act_gated: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for 16-bit x [..., K] and weight [N, K] -> [..., N] in x's dtype; act_gated (a
    [gate | up] weight of two equal halves): silu(gate) * up -> [..., N / 2], the bits of F.linear then
    triton_ops' SiLU-and-mul up to the GEMM's sum order (no gate/up rows in memory, no SiLU launch)."""
    shape = x.shape
    y = _launch(x.reshape(-1, shape[-1]), None, weight, None, bias, x.dtype, tile, act_gated)
    return y.reshape(*shape[:-1], y.shape[-1])


def fits_16bit(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether gemm_16bit serves x: 2 to MAX_ROWS_16BIT rows of 16-bit activations (a decode step's), the weight
    in their dtype, K a multiple of 16 (the dot's)."""
    rows = x.numel() // max(x.shape[-1], 1)
    return (x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype and 2 <= rows <= MAX_ROWS_16BIT
            and x.shape[-1] % 16 == 0)
