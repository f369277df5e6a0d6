"""A Triton fp8 GEMM with per-token activation scales and per-channel weight scales: torch._scaled_mm's rowwise
contract, y[M, N] = (xq[M, K] . wq[N, K]^T) * xs[M] * ws[N] (+ bias), fp32 accumulation, out in 16 bits.
Reference: quant_ref.fp8_linear_ref after the quantization (the same products and scales).

Why: at W2's batch (M ~256) torch._scaled_mm ran the 8B's projections at 50-60% of both roofs (H200, twenty-
seventh session: gate_up 56.2 us = 1.07 PFLOP/s and 2.1 TB/s of weights; down 41.0 us = 0.73 PFLOP/s, 1.4 TB/s,
where ~17 us is the larger of its two floors), 3.7 ms of a 9.4 ms fp8 W2 step. Two causes this kernel addresses:
the small-N projections (qkv, o, down: 64-96 output tiles of 128 x 128 at M 256) leave a 132-SM GPU half idle,
and the tile shape is fixed per M. Here:
* tiles come from rowwise_tile(m, n, k) or are given (tools/bench_fp8_rowwise.py sweeps them on the device);
* SPLIT_K > 1 cuts K so a small-N projection fills the GPU: each split stores its fp32 partial tile, and the
  split that draws the tile's last ticket sums them (.cg loads: other SMs wrote them), scales, stores and resets
  the ticket (tickets: int32, zero between launches; launches on one stream, as the engine runs);
* programs walk output tiles GROUP_M row-tiles at a time per weight column tile (the weight stays in L2 while
  the row-tiles that need it run).
Opt-in: MESHSERVE_FP8_GEMM=triton (layers/backend_selection.py); _scaled_mm stays the default until measured.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 14  # output tiles of one split-K launch (the ticket buffer)


@triton.jit(do_not_specialize=["M"])  # per-step row counts (triton_unified_attention)
def _fp8_rowwise_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, ws_ptr, ticket_ptr,
    M, N, K,
    stride_am, stride_bn, stride_cm,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr,
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
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kt in range(kt0, kt1):
        kk = kt * BLOCK_K + rk
        if EVEN_K:
            a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None], other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=n_mask[None, :], other=0.0)
        else:
            k_mask = kk < K
            a = tl.load(a_rows + kk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_cols + kk[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
    if SPLIT_K == 1:
        _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, HAS_BIAS)
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
            _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, HAS_BIAS)
            tl.store(ticket_ptr + tile, 0)


@triton.jit
def _epilogue(acc, as_ptr, bs_ptr, bias_ptr, c_ptr, rm, rn, m_mask, n_mask, stride_cm, HAS_BIAS: tl.constexpr):
    """The rowwise scales (and bias) on the fp32 sum, then the 16-bit store: _scaled_mm's order."""
    xs = tl.load(as_ptr + rm, mask=m_mask, other=0.0)
    ws = tl.load(bs_ptr + rn, mask=n_mask, other=0.0)
    y = acc * xs[:, None] * ws[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None].to(tl.int64) * stride_cm + rn[None, :], y.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@functools.cache
def _num_sms(device_index: int | None) -> int:
    if not torch.cuda.is_available():
        return 8  # the interpreter: only the split heuristic reads it
    return torch.cuda.get_device_properties(device_index or 0).multi_processor_count


_tickets: dict[torch.device, torch.Tensor] = {}


def _ticket_workspace(device: torch.device) -> torch.Tensor:
    """int32 [MAX_TILES], zero between launches (each tile's last split resets its ticket); made once per device
    by the first split-K launch (the engine's warm-ups run eagerly before any graph capture)."""
    tickets = _tickets.get(device)
    if tickets is None:
        tickets = _tickets[device] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return tickets


def rowwise_tile(m: int, n: int, k: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for an [m, k] x [k, n] launch: a first guess
    by M bucket (not measured yet: tools/bench_fp8_rowwise.py), then K split while the output tiles fill less
    than one wave, each split keeping at least 8 K tiles."""
    if m <= 64:
        bm, bn, warps, stages = 64, 64, 4, 5
    elif m <= 128:
        bm, bn, warps, stages = 64, 128, 4, 4
    elif m <= 256:
        bm, bn, warps, stages = 128, 128, 8, 4
    else:
        bm, bn, warps, stages = 128, 256, 8, 3
    bk = 128
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    while tiles * split * 2 <= num_sms and triton.cdiv(k, bk) // (split * 2) >= 8:
        split *= 2
    return bm, bn, bk, split, warps, stages


def fp8_rowwise_gemm(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     bias: torch.Tensor | None, out_dtype: torch.dtype,
                     tile: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """xq [M, K] fp8 with xs [M, 1] (or [M]) fp32, weight [N, K] fp8 with weight_scale [N] -> [M, N] in out_dtype
    (torch._scaled_mm(xq, weight.t(), scale_a=xs, scale_b=weight_scale[None, :]) + bias). tile: rowwise_tile's
    six values, None: rowwise_tile's choice."""
    m, k = xq.shape
    n = weight.shape[0]
    y = torch.empty((m, n), dtype=out_dtype, device=xq.device)
    if not m:
        return y
    if xq.stride(1) != 1:
        xq = xq.contiguous()
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    bm, bn, bk, split, warps, stages = tile or rowwise_tile(
        m, n, k, _num_sms(xq.device.index if xq.is_cuda else None))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    # the tickets are made outside any CUDA-graph capture (a capture's allocation belongs to its graph's pool):
    # a split launch first met while capturing takes no split
    if split > 1 and (tiles > MAX_TILES or (xq.device not in _tickets and xq.is_cuda
                                            and torch.cuda.is_current_stream_capturing())):
        split = 1
    ws = torch.empty((tiles, split, bm, bn) if split > 1 else (1,), dtype=torch.float32, device=xq.device)
    tickets = _ticket_workspace(xq.device) if split > 1 else ws
    _fp8_rowwise_kernel[(tiles, split)](
        xq, xs.reshape(-1).float().contiguous(), weight, weight_scale.reshape(-1).float().contiguous(),
        bias if bias is not None else y, y, ws, tickets,
        m, n, k,
        xq.stride(0), weight.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, GROUP_M=8,
        EVEN_K=k % bk == 0, num_warps=warps, num_stages=stages,
    )
    return y
