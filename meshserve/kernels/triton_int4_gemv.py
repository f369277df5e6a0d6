"""INT4 GEMV for decode batches (M <= 4 rows) in Triton: y[M, N] = x[M, K] @ W[K, N] (+ bias), W in the internal
INT4 layout (kernels/quant_ref.py: qweight [K/8, N] int32, scales/zeros [G, N], optional g_idx [K]).

No tl.dot and no padding of M to 16: each program owns block_n output features and a K range (split-K, see
gemv_tiles.py), loads block_k / 8 packed rows of block_n int32 (coalesced along N: 8 input features per word),
unpacks the 8 nibbles and accumulates x * q in fp32, one accumulator row per input row (the weights are read
once for all M rows). The dequant-GEMM (triton_quant.int4_matmul) spends two conversions per weight
(int -> fp32 -> bf16) and a 16-row MMA on one useful row; it reached 9.8% of the int4 roofline at batch 1.

Variants (tools/bench_quant_gemv.py, MESHSERVE_INT4_GEMV):
  magic  no conversion instruction: the even and the odd nibbles of a word are masked into bytes (3 ops per
         word), one PRMT per weight puts a byte under the exponent of 2^23 (0x4B000000 | q is the float
         2^23 + q), and one subtraction of 2^23 + z (exact: integers below 2^24) gives q - z; with the FFMA
         ~4.9 sm_90 instructions per weight in the loop (one row: 2-D tiles, no shared memory)
  cvt    ((word >> 4i) & 15).to(fp32): one int -> float conversion per weight (16 / clock / SM on Hopper, about
         half the rate int4 weights arrive at 4+ TB/s), kept to measure the difference
Zero points and scales: when a K step lies inside one group (no g_idx, group_size a multiple of block_k), z is
subtracted per weight and s applied once per column to the step's sum; otherwise (act-order g_idx, small groups)
every weight is dequantized as (q - z) * s with its own group's scale (slower, the same numbers).
Split-K partials are summed by gemv_tiles.split_k_reduce, or (fused_reduce) by each column block's last
program to finish. Reference: quant_ref.int4_linear_ref (bit-exact weights; fp32 sums in another order).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from meshserve.kernels.gemv_tiles import GemvTiles, split_k_range, split_k_reduce

INT4_GEMV_VARIANTS = ("magic", "cvt")


def _interpreting() -> bool:
    """The Triton CPU interpreter runs no inline PTX: the PRMT spelling is for compiled code only."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


MAX_GEMV_ROWS = 4  # larger batches go to the dequant-GEMM, whose MMA then does useful work


@triton.jit
def _nibble_bytes(packed, MAGIC: tl.constexpr):
    """MAGIC: (even nibbles, odd nibbles), each nibble alone in a byte (two masks per word)."""
    if MAGIC:
        w = packed.to(tl.uint32, bitcast=True)
        return w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
    else:
        return packed, packed


@triton.jit
def _prmt_magic(src, J: tl.constexpr):
    """[src.byte(J), 0x00, 0x00, 0x4B] in one PRMT (selector 0x754J: bytes 4..7 are those of 0x4B000000)."""
    if J == 0:
        sel: tl.constexpr = "0x7540"
    elif J == 1:
        sel: tl.constexpr = "0x7541"
    elif J == 2:
        sel: tl.constexpr = "0x7542"
    else:
        sel: tl.constexpr = "0x7543"
    magic = tl.full(src.shape, 0x4B000000, tl.uint32)  # one register for all (a splat constant)
    return tl.inline_asm_elementwise(
        "prmt.b32 $0, $1, $2, " + sel + ";", "=r,r,r", [src, magic], dtype=tl.uint32, is_pure=True, pack=1
    )


@triton.jit
def _nibble(packed, even, odd, i: tl.constexpr, MAGIC: tl.constexpr, PRMT: tl.constexpr):
    """Nibble i of each word as fp32: MAGIC 2^23 + q (the nibble's byte or-ed into the mantissa of 2^23; the
    caller subtracts 2^23 + z in one step), else q. PRMT: one byte permute per weight takes byte i // 2 and
    the bytes of 0x4B000000 (the compiler's shift + bit-field extract + or are 3 ops; the interpreter has no
    inline PTX, so CPU tests run the shift-and-mask spelling of the same bits)."""
    if MAGIC:
        src = even if i % 2 == 0 else odd
        if PRMT:  # d = [src.byte(i // 2), m.byte1, m.byte2, m.byte3] with m = 0x4B000000 (bytes 4..7)
            bits = _prmt_magic(src, i // 2)
        elif i >= 6:  # the top byte: the shift alone isolates it
            bits = (src >> 24) | 0x4B000000
        else:
            bits = ((src >> (8 * (i // 2))) & 0xFF) | 0x4B000000
        return bits.to(tl.float32, bitcast=True)
    else:
        return ((packed >> (4 * i)) & 0xF).to(tl.float32)


@triton.jit
def _split8(t):
    """t [..., 2, 2, 2] -> the 8 tensors t[..., i // 4, i // 2 % 2, i % 2] for i = 0..7."""
    even, odd = tl.split(t)
    e0, e1 = tl.split(even)
    o0, o1 = tl.split(odd)
    x0, x4 = tl.split(e0)
    x2, x6 = tl.split(e1)
    x1, x5 = tl.split(o0)
    x3, x7 = tl.split(o1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _int4_gemv_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    g_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    group_size,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_ym,
    kp_per_split,
    HAS_G_IDX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    GROUP_UNIFORM: tl.constexpr,
    MAGIC: tl.constexpr,
    PRMT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
):
    pid_k = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rm = tl.arange(0, BLOCK_M)
    mmask = rm < M
    rp = tl.arange(0, BLOCK_KP)
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    kp_lo = pid_k * kp_per_split
    kp_hi = tl.minimum(K // 8, kp_lo + kp_per_split)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for p0 in range(kp_lo, kp_hi, BLOCK_KP):
        pr = p0 + rp
        pmask = pr < kp_hi
        packed = tl.load(
            qw_ptr + pr[:, None].to(tl.int64) * stride_qk + rn[None, :],
            mask=pmask[:, None] & nmask[None, :],
            other=0,
        )
        xmask = mmask[:, None] & pmask[None, :]
        if GROUP_UNIFORM:  # the whole step is in group p0 * 8 // group_size
            # the step's x in one vector load per row ([M, KP * 8]: features 8p + i), split into x of nibble i
            xk = p0 * 8 + tl.arange(0, BLOCK_KP * 8)
            x_all = tl.load(x_rows + xk[None, :], mask=mmask[:, None] & (xk < kp_hi * 8)[None, :], other=0.0)
            g_off = (p0 * 8 // group_size).to(tl.int64) * stride_sg + rn
            s = tl.load(s_ptr + g_off, mask=nmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + g_off, mask=nmask, other=0.0).to(tl.float32)
            if MAGIC:
                z += 8388608.0  # exact: integers below 2^24
            even, odd = _nibble_bytes(packed, MAGIC)
            if BLOCK_M == 1:  # 2-D tiles: the 3-D form costs a layout change in shared memory every step
                xs = _split8(tl.reshape(tl.sum(x_all.to(tl.float32), 0), [BLOCK_KP, 2, 2, 2]))
                step = tl.zeros([BLOCK_KP, BLOCK_N], dtype=tl.float32)
                for i in tl.static_range(8):
                    step += (_nibble(packed, even, odd, i, MAGIC, PRMT) - z[None, :]) * xs[i][:, None]
                acc += (s * tl.sum(step, 0))[None, :]
            else:
                xs = _split8(tl.reshape(x_all.to(tl.float32), [BLOCK_M, BLOCK_KP, 2, 2, 2]))
                step = tl.zeros([BLOCK_M, BLOCK_KP, BLOCK_N], dtype=tl.float32)
                for i in tl.static_range(8):
                    w = _nibble(packed, even, odd, i, MAGIC, PRMT) - z[None, :]  # q - z, exact
                    step += w[None, :, :] * xs[i][:, :, None]
                acc += s[None, :] * tl.sum(step, 1)
        else:  # every weight with its own group's scale and zero
            even, odd = _nibble_bytes(packed, MAGIC)
            step = tl.zeros([BLOCK_M, BLOCK_KP, BLOCK_N], dtype=tl.float32)
            for i in tl.static_range(8):
                kk = pr * 8 + i
                x = tl.load(x_rows + kk[None, :], mask=xmask, other=0.0).to(tl.float32)
                if HAS_G_IDX:
                    g = tl.load(g_ptr + kk, mask=pmask, other=0)
                else:
                    g = kk // group_size
                g_off = g[:, None].to(tl.int64) * stride_sg + rn[None, :]
                wmask = pmask[:, None] & nmask[None, :]
                s = tl.load(s_ptr + g_off, mask=wmask, other=0.0).to(tl.float32)
                z = tl.load(z_ptr + g_off, mask=wmask, other=0.0).to(tl.float32)
                if MAGIC:
                    z += 8388608.0
                step += ((_nibble(packed, even, odd, i, MAGIC, PRMT) - z) * s)[None, :, :] * x[:, :, None]
            acc += tl.sum(step, 1)
    mask = mmask[:, None] & nmask[None, :]
    if SPLIT:
        part = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        if FUSED_REDUCE:  # the column block's last program to finish sums the partials: no reduce kernel
            tl.debug_barrier()  # every thread's partial is stored before the count
            done = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
            if done == tl.num_programs(1) - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in range(tl.num_programs(1)):  # .cg: from L2, where the other programs' stores are
                    acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                _store_y(acc, y_ptr, b_ptr, rm, rn, nmask, mask, stride_ym, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)  # zero again for the next call or graph replay
    else:
        _store_y(acc, y_ptr, b_ptr, rm, rn, nmask, mask, stride_ym, HAS_BIAS)


@triton.jit
def _store_y(acc, y_ptr, b_ptr, rm, rn, nmask, mask, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_counters: dict[torch.device, torch.Tensor] = {}
_MAX_COUNTERS = 1 << 16  # column blocks of one launch; allocated once per device and never replaced (CUDA
# graphs captured with the fused reduce keep its address)


def _split_counters(device: torch.device, blocks: int) -> torch.Tensor | None:
    """The zeroed int32 counters of the fused split-K reduce, one per column block, kept for the process (every
    kernel leaves them zero). None when a launch has more blocks, or while a CUDA graph is being captured and
    none is allocated yet (a buffer made then would belong to the graph's pool): the two-kernel reduce then."""
    have = _counters.get(device)
    if have is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        have = _counters[device] = torch.zeros(_MAX_COUNTERS, dtype=torch.int32, device=device)
    return have if blocks <= have.numel() else None


def default_int4_tiles(n: int, k: int, num_sms: int = 132) -> GemvTiles:
    """256 columns (2 warps of 32 lanes x 4 int32: each thread holds its columns' whole K step, so the sum over
    the step stays in registers), 64 features (8 packed rows) a step, split-K up to ~2 programs per SM with
    at least 4 steps each. sm_90 code of this shape: ~4.9 instructions per weight in the loop, no spills, no
    barriers. Best guesses until the H200 sweep (tools/bench_quant_gemv.py)."""
    block_n, block_k = 256, 64
    col_blocks = triton.cdiv(n, block_n)
    split = max(1, min(triton.cdiv(2 * num_sms, col_blocks), k // (4 * block_k)))
    return GemvTiles(block_n, block_k, split_k=split, num_warps=2, num_stages=3)


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    variant: str = "magic",
    tiles: GemvTiles | None = None,
    fused_reduce: bool = False,
) -> torch.Tensor:
    """Same as quant_ref.int4_linear_ref for x [..., K] of at most MAX_GEMV_ROWS rows -> [..., N] in x.dtype.
    fused_reduce: split-K partials summed by each column block's last program (a counter per block in a
    persistent buffer that the summing program zeroes again) instead of a second kernel."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if x2.shape[1] != k or m > MAX_GEMV_ROWS:
        raise ValueError(f"int4_gemv takes <= {MAX_GEMV_ROWS} rows of {k} features, got {tuple(shape)}")
    if variant not in INT4_GEMV_VARIANTS:
        raise ValueError(f"unknown int4 GEMV variant {variant!r} ({', '.join(INT4_GEMV_VARIANTS)})")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    tiles = tiles or default_int4_tiles(n, k)
    if tiles.block_k % 8:
        raise ValueError(f"int4_gemv: block_k {tiles.block_k} is not whole packed rows")
    per_split, splits = split_k_range(k, tiles)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    counters = (
        _split_counters(x.device, triton.cdiv(n, tiles.block_n)) if splits > 1 and fused_reduce else None
    )
    if m:
        _int4_gemv_kernel[(triton.cdiv(n, tiles.block_n), splits)](
            x2,
            qweight,
            scales,
            zeros,
            g_idx if g_idx is not None else qweight,
            bias if bias is not None else y,
            y,
            partials,
            counters if counters is not None else qweight,
            m,
            n,
            k,
            group_size,
            x2.stride(0),
            qweight.stride(0),
            scales.stride(0),
            y.stride(0),
            per_split // 8,
            HAS_G_IDX=g_idx is not None,
            HAS_BIAS=bias is not None,
            SPLIT=splits > 1,
            FUSED_REDUCE=counters is not None,
            GROUP_UNIFORM=g_idx is None and group_size % tiles.block_k == 0,
            MAGIC=variant == "magic",
            PRMT=x.is_cuda and not _interpreting(),
            BLOCK_M=triton.next_power_of_2(m),
            BLOCK_N=tiles.block_n,
            BLOCK_KP=tiles.block_k // 8,
            num_warps=tiles.num_warps,
            num_stages=tiles.num_stages,
        )
        if splits > 1 and counters is None:
            split_k_reduce(partials, y, None, bias)
    return y.reshape(*shape[:-1], n)
