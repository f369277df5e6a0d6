"""Batch-1 projection (GEMV) in Triton: y[1, N] = x[1, K] @ W[N, K]^T (+ bias), 16-bit weights.

A decode step at batch 1 is a chain of weight reads; cuBLAS picks GEMM tiles that leave small projections
at 30-80% of the bandwidth and pays a split-K reduce on some shapes. This kernel streams W once in row
blocks of 4 (N / 4 programs, enough to fill the GPU for every shape of the W1 models) with fp32
accumulation. Measured on an H100 (tools/bench_gemv.py, inside CUDA graphs): Llama-3.1-8B gate_up 84 -> 79
us, o 11.0 -> 8.5 us, LM head 377 -> 337 us; Qwen3-0.6B projections 4-6.5 -> 3.3-4.1 us.

With gated=True the input row is the merged [gate, up] projection (2K features) and the kernel applies
SiLU-and-mul on the fly (rounded to the activation dtype as the separate kernel does), so the MLP's down
projection reads gate/up once and the activation never goes to memory.

gemv_ref is F.linear (after SiLU-and-mul when gated): the same result up to the order of the fp32
accumulation.

rms_norm_gemv folds the decoder layer's residual add + RMSNorm into the next projection (input_layernorm ->
qkv_proj, post_attention_layernorm -> gate_up_proj): one single-program kernel sums h = x + residual (the new
residual) and writes 1 / rms(h) as one fp32 scalar; the GEMV programs read h, scale it by that scalar and the
norm weight on load (no normed row in memory). The roundings are rms_norm's (sum in the activation dtype,
statistics in fp32 as rms_norm's kernel takes them, normed rounded to the activation dtype, times the norm
weight, rounded again), so its normed row is rms_norm's bit for bit and rms_norm_gemv_ref (rms_norm_ref,
then F.linear) differs only by fp32 summation order. The first version reduced the row in every GEMV program
(each re-reading 2 x 8 KB before its weights): Llama-3.1-8B decode fell 210.7 -> 191.6 tok/s on an H200.

With PDL (kernels/pdl.py) each GEMV program loads its first MAX_PRE_K weight columns before waiting on the
previous kernel, so the weight stream starts under that kernel's tail; the fp32 sum is then taken in two
parts (a few output ulps from the plain layout, which PRE_K = 0 keeps bit for bit). The preload costs
registers (29 -> 61 a thread at 8 warps, ptxas sm_90: half the programs per SM for the rest of the row), so
the PDL policy may keep it to rows it holds whole (PdlPolicy.preload).

The dense GEMV loads each trip's next K tile of weights before the trip's math (gemv_prefetch), doubling the
bytes a program has in flight (29 -> 40 registers at 8 warps: 6 programs an SM instead of 8); the sums and their
order are unchanged, so the output is the same bit for bit. H200 W1, 2026-12-03, two processes each: Llama-3.1-8B
214.3 -> 222.7 tok/s (decode graph 4.64 -> 4.46 ms); Qwen3-30B-A3B 350.7 -> 352.6 (with the MoE gate_up's too:
349.9, so that one stays opt-in); Qwen3-0.6B 1,106.2 -> 1,098.8 (within its process-to-process spread).
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_ops import silu_mul


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
             gated: bool = False, act_out: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias); gated: x is [gate | up] and the GEMV reads silu(gate) * up; act_out: the
    output is [gate | up] and the GEMV returns silu(gate) * up (a gate/up projection with SiLU-and-mul)."""
    if gated:
        gate, up = x.chunk(2, dim=-1)
        x = F.silu(gate) * up
    y = F.linear(x, weight, bias)
    if act_out:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


@triton.jit
def _gemv_x(x_ptr, kk, kmask, K, GATED: tl.constexpr):
    """One K-block of the input row in fp32 (gated: silu(gate) * up, each rounded like silu_and_mul)."""
    if GATED:
        dt = x_ptr.dtype.element_ty
        gate = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + kk, mask=kmask, other=0.0).to(tl.float32)
        x = silu_mul(gate, up, dt).to(tl.float32)
    else:
        x = tl.load(x_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _normed_x(h_ptr, nw_ptr, inv_rms, kk, kmask):
    """One K-block of rms_norm's output: (norm_weight * (h * inv_rms).to(dt)).to(dt), in fp32."""
    dt = h_ptr.dtype.element_ty
    h = tl.load(h_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
    nw = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
    return (nw * (h * inv_rms).to(dt).to(tl.float32)).to(dt).to(tl.float32)


@triton.jit
def _row_x(x_ptr, nw_ptr, inv_rms, kk, kmask, K, GATED: tl.constexpr, NORMED: tl.constexpr):
    """One K-block of the GEMV's input row in fp32: rms_norm's output of the row at x_ptr (NORMED), else
    the row itself (gated: silu(gate) * up)."""
    if NORMED:
        return _normed_x(x_ptr, nw_ptr, inv_rms, kk, kmask)
    else:
        return _gemv_x(x_ptr, kk, kmask, K, GATED)


@triton.jit
def _stream_rows(x_ptr, nw_ptr, inv_rms, w_rows, rmask, K, GATED: tl.constexpr, NORMED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRE_K: tl.constexpr, PREFETCH: tl.constexpr):
    """The GEMV's main loop from column PRE_K on: [BLOCK_N, BLOCK_K] fp32 partial products of the program's rows
    (w_rows) and the input row, summed over the K tiles (reduced by the caller). PREFETCH: each trip loads the
    next tile's weights before its own math, two tiles in flight (Triton's pipeliner stages only loads that
    feed tl.dot); the same sums in the same order, so the same bits."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    if PREFETCH:
        w_next = tl.load(w_rows + (PRE_K + ks)[None, :], mask=rmask[:, None] & (PRE_K + ks < K)[None, :], other=0.0)
        for k0 in range(PRE_K, K, BLOCK_K):
            kk = k0 + ks
            w = w_next
            kn = kk + BLOCK_K  # past K on the last trip: masked off, nothing read
            w_next = tl.load(w_rows + kn[None, :], mask=rmask[:, None] & (kn < K)[None, :], other=0.0)
            x = _row_x(x_ptr, nw_ptr, inv_rms, kk, kk < K, K, GATED, NORMED)
            acc += w.to(tl.float32) * x[None, :]
    else:
        for k0 in range(PRE_K, K, BLOCK_K):
            kk = k0 + ks
            kmask = kk < K
            x = _row_x(x_ptr, nw_ptr, inv_rms, kk, kmask, K, GATED, NORMED)
            w = tl.load(w_rows + kk[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            acc += w.to(tl.float32) * x[None, :]
    return acc


@triton.jit
def _gemv_kernel(x_ptr, inv_ptr, nw_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, NORMED: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PRE_K: tl.constexpr, PREFETCH: tl.constexpr = False,
                 USE_GDC: tl.constexpr = False, ACT_OUT: tl.constexpr = False):
    """gemv's kernel, and rms_norm_gemv's second one with NORMED: x_ptr then holds h, inv_ptr and nw_ptr the
    1 / rms(h) of _residual_rms_kernel and the norm weight (unused without NORMED). PREFETCH: gemv_prefetch
    ("dense"), _stream_rows'. ACT_OUT: the weight's rows are [gate | up] (N / 2 each); a program takes
    BLOCK_N / 2 gate rows and their up rows (interleaved: row 2i gate i, row 2i + 1 up i) and writes
    silu(gate) * up, with silu_and_mul's roundings on the GEMV's rounded outputs: the SiLU kernel's bits."""
    if ACT_OUT:
        r = tl.arange(0, BLOCK_N)
        pairs = tl.program_id(0) * (BLOCK_N // 2) + r // 2
        rows = pairs + (r % 2) * (N // 2)
        rmask = pairs < N // 2
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    y = tl.zeros([BLOCK_N], dtype=tl.float32)
    if PRE_K > 0:  # PDL: the first PRE_K columns of this program's weights load before the wait (no kernel
        kp = tl.arange(0, PRE_K)  # writes weights), overlapping the previous kernel's tail
        pmask = kp < K
        w_pre = tl.load(w_rows + kp[None, :], mask=rmask[:, None] & pmask[None, :], other=0.0)
    gdc_wait(USE_GDC)  # the input row (NORMED: h and inv_rms) is the previous kernel's output
    if NORMED:
        inv_rms = tl.load(inv_ptr)
    else:
        inv_rms = 1.0
    if PRE_K > 0:
        y += tl.sum(w_pre.to(tl.float32) * _row_x(x_ptr, nw_ptr, inv_rms, kp, pmask, K, GATED, NORMED)[None, :], 1)
    acc = _stream_rows(x_ptr, nw_ptr, inv_rms, w_rows, rmask, K, GATED, NORMED, BLOCK_N, BLOCK_K, PRE_K, PREFETCH)
    gdc_trigger_late(USE_GDC)
    y += tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    if ACT_OUT:
        dt = y_ptr.dtype.element_ty
        gate, up = tl.split(tl.reshape(y.to(dt).to(tl.float32), [BLOCK_N // 2, 2]))
        outs = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + outs, silu_mul(gate, up, dt), mask=outs < N // 2)
    else:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=rmask)


# columns of weights a PDL GEMV program preloads: 4 rows x 2,048 16-bit values = 16 KB in registers (32 per
# thread at 8 warps, 64 at 4), the whole row for Qwen3-0.6B's QKV / gate_up / o_proj
MAX_PRE_K = 2048


# rows of at least this many features take the wide tile on 4 warps instead of 8 (wide_tile)
WIDE_FOUR_WARPS_K = 4096


def wide_tile(k: int = WIDE_FOUR_WARPS_K) -> tuple[int, int, int]:
    """(block_k, num_warps, block_n) of GEMVs over rows of k >= 2,048 features (narrower rows: 256 on 4 warps, 4
    rows a program): 512 columns a trip, 4 rows, on 4 warps from WIDE_FOUR_WARPS_K up and on 8 below.
    MESHSERVE_GEMV_WIDE_TILE="block_k,num_warps[,block_n]" for A/Bs (every wide row; read at each launch: graphs
    capture launches once; block_n applies to gemv's launches: the MoE GEMV's down kernel ran 7% faster with one
    row a program than four, 2026-12-03). H200 W1, two processes each: on 2026-12-03 (8 warps everywhere, PDL off
    on the 8B) 256 on 4 warps was 2.5% (Qwen3-30B-A3B) and 7% (Llama-3.1-8B) slower and 512 on 4 the same; on
    2026-12-04 (the prefetched loop, PDL on the 8B's one-row steps) 512 on 4 for every wide row: Llama-3.1-8B
    229.6 -> 230.9 tok/s (decode graph 4.328 -> 4.304 ms), Qwen3-30B-A3B 362.0 -> 362.9 (its o_proj, K 4,096),
    Qwen3-0.6B 1,103.1 -> 1,096.5 (its down_proj, K 3,072, where the PDL preload holds 2,048 columns): hence
    by K. 1,024 on 8 warps: 224.8 on the 8B."""
    spec = os.environ.get("MESHSERVE_GEMV_WIDE_TILE", "")
    if not spec:
        return 512, (4 if k >= WIDE_FOUR_WARPS_K else 8), 4
    values = spec.split(",")
    try:
        if len(values) not in (2, 3):
            raise ValueError
        block_k, num_warps, block_n = (*(int(v) for v in values), 4)[:3]
    except ValueError:
        raise ValueError(f"MESHSERVE_GEMV_WIDE_TILE={spec!r}: expected block_k,num_warps[,block_n]") from None
    return block_k, num_warps, block_n


PREFETCH_ENV = "MESHSERVE_GEMV_PREFETCH"
PREFETCH_KINDS = ("dense", "moe")
PREFETCH_DEFAULT = "dense"


def gemv_prefetch(kind: str) -> bool:
    """Whether the `kind` loop ("dense": this module's GEMV and the norm fold's; "moe": the MoE GEMV's gate_up)
    loads a K tile ahead. MESHSERVE_GEMV_PREFETCH is a comma-separated set of kinds, "all" (or 1) or "0"/"none";
    default "dense", the one measured faster on the H200 (module docstring). Read at each launch, as wide_tile
    (graphs capture launches once). The same loop in the fp8-weight GEMV (4 x 2,048 tiles on 4 warps, ~106
    registers before it) cost W1 Llama-3.1-8B fp8 24% (332.8 -> 253.9 tok/s, H200 2026-12-03) and was removed."""
    return kind in _prefetch_kinds(os.environ.get(PREFETCH_ENV, PREFETCH_DEFAULT))


@functools.cache
def _prefetch_kinds(raw: str) -> frozenset[str]:
    """MESHSERVE_GEMV_PREFETCH's value as its set of kinds, parsed once per value (gemv_prefetch runs at every
    eager launch)."""
    value = raw.strip().lower() or PREFETCH_DEFAULT
    if value in ("all", "1"):
        return frozenset(PREFETCH_KINDS)
    if value in ("0", "none"):
        return frozenset()
    kinds = frozenset(k.strip() for k in value.split(","))
    if not kinds <= set(PREFETCH_KINDS):
        raise ValueError(f"{PREFETCH_ENV}={value!r}: expected a comma-separated set of "
                         f"{', '.join(PREFETCH_KINDS)}, or all, or 0")
    return kinds


def _tile(k: int) -> tuple[int, int, int]:
    return wide_tile(k) if k >= 2048 else (256, 4, 4)


def _launch(x: torch.Tensor, n: int, k: int, block_n: int, pdl: bool | None) -> tuple[int, int, dict, int]:
    """(programs, num_warps, PDL launch keywords, preloaded columns) of a GEMV launch over N rows of K."""
    programs, num_warps = triton.cdiv(n, block_n), _tile(k)[1]
    gdc = pdl_mod.gdc_kwargs(x, pdl, programs=programs, num_warps=num_warps)
    pre_k = pdl_mod.preload_columns(x, k, pdl, gdc, MAX_PRE_K) if block_n <= 4 else 0  # (registers: see MAX_PRE_K)
    return programs, num_warps, gdc, pre_k


def _output(x: torch.Tensor, n: int, block_n: int, act_out: bool, name: str) -> tuple[torch.Tensor, int]:
    """(y, rows a program) of a GEMV over n weight rows: y [..., n], or with act_out [..., n / 2] (n even) and at
    least one gate row and its up row a program."""
    if not act_out:
        return torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device), block_n
    if n % 2:
        raise ValueError(f"{name}'s act_out takes an even number of [gate | up] rows, got N {n}")
    return torch.empty((*x.shape[:-1], n // 2), dtype=x.dtype, device=x.device), max(block_n, 2)


def rms_norm_gemv_ref(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                      weight: torch.Tensor, bias: torch.Tensor | None = None, act_out: bool = False):
    """(F.linear(rms_norm(x + residual)), x + residual); without a residual (F.linear(rms_norm(x)), x); act_out:
    silu(gate) * up of that [gate | up] output (gemv_ref's)."""
    from meshserve.kernels.triton_ops import rms_norm_ref

    if residual is None:
        normed, new_residual = rms_norm_ref(x, norm_weight, eps), x
    else:
        normed, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return gemv_ref(normed, weight, bias, act_out=act_out), new_residual


@triton.jit
def _residual_rms_kernel(x_ptr, res_ptr, res_out_ptr, inv_ptr, K, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_GDC: tl.constexpr = False):
    """One program: h = x + residual (stored: the next residual) and 1 / rms(h) as one fp32 scalar; the
    statistics of _rms_norm_kernel, so the normed values below are rms_norm's bit for bit."""
    cols = tl.arange(0, BLOCK)
    mask = cols < K
    gdc_wait(USE_GDC)
    h = tl.load(x_ptr + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + cols, mask=mask, other=0.0)
    gdc_trigger_late(USE_GDC)
    if HAS_RESIDUAL:
        h = (h.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + cols, h, mask=mask)
    hf = h.to(tl.float32)
    tl.store(inv_ptr, 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / K + eps))


def rms_norm_gemv(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  weight: torch.Tensor, bias: torch.Tensor | None = None, block_n: int = 4,
                  pdl: bool | None = None, act_out: bool = False):
    """Same as rms_norm_gemv_ref for one row x [..., K] (residual alike, or None), norm_weight [K] and
    weight [N, K] all of x's dtype; returns (y [..., N], the new residual: x + residual, or x itself); act_out:
    y [..., N / 2] = silu(gate) * up, as gemv's. pdl: the PDL layout and launch (None: the process switch,
    kernels/pdl.py)."""
    n, k = weight.shape
    if x.numel() != k or norm_weight.numel() != k or (residual is not None and residual.numel() != k):
        raise ValueError(f"rms_norm_gemv takes one row of {k} features, got shape {tuple(x.shape)}")
    if not (norm_weight.dtype == weight.dtype == x.dtype and (residual is None or residual.dtype == x.dtype)):
        raise ValueError("rms_norm_gemv needs x, residual, norm weight and weight of one dtype")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    y, block_n = _output(x, n, block_n, act_out, "rms_norm_gemv")
    new_residual = torch.empty_like(x) if residual is not None else x
    inv_rms = torch.empty(1, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _residual_rms_kernel[(1,)](
        x, residual.contiguous() if residual is not None else x, new_residual, inv_rms, k, float(eps),
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(16, max(1, block // 256)),
        **pdl_mod.gdc_kwargs(x, pdl))
    block_k = _tile(k)[0]
    programs, num_warps, gdc, pre_k = _launch(x, n, k, block_n, pdl)
    _gemv_kernel[(programs,)](
        new_residual, inv_rms, norm_weight, weight, bias if bias is not None else weight, y, n, k,
        weight.stride(0), HAS_BIAS=bias is not None, GATED=False, NORMED=True, BLOCK_N=block_n,
        BLOCK_K=block_k, PRE_K=pre_k, PREFETCH=gemv_prefetch("dense"), num_warps=num_warps, num_stages=3, **gdc,
        ACT_OUT=act_out)
    return y, new_residual


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         gated: bool = False, pdl: bool | None = None, act_out: bool = False) -> torch.Tensor:
    """Same as gemv_ref for x [..., K] (gated: [..., 2K]) holding one row, weight [N, K] (rows contiguous;
    act_out: [gate | up], N even, y [..., N / 2] = silu(gate) * up: no gate/up row in memory, no SiLU launch).
    pdl: the PDL layout and launch (None: the process switch, kernels/pdl.py)."""
    n, k = weight.shape
    if x.numel() != (2 * k if gated else k):
        raise ValueError(f"gemv takes one row of {2 * k if gated else k} features, got shape {tuple(x.shape)}")
    if act_out and gated:
        raise ValueError("gemv's act_out takes no gated input")
    x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    block_k, _, block_n = _tile(k)
    y, block_n = _output(x, n, block_n, act_out, "gemv")
    programs, num_warps, gdc, pre_k = _launch(x, n, k, block_n, pdl)
    _gemv_kernel[(programs,)](
        x, weight, weight, weight, bias if bias is not None else weight, y, n, k, weight.stride(0),
        HAS_BIAS=bias is not None, GATED=gated, NORMED=False, BLOCK_N=block_n, BLOCK_K=block_k, PRE_K=pre_k,
        PREFETCH=gemv_prefetch("dense"), num_warps=num_warps, num_stages=3, **gdc,
        ACT_OUT=act_out)
    return y
