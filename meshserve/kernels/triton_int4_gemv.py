"""INT4 GEMV for decode batches (M <= 4 rows) in Triton: y[M, N] = x[M, K] @ W[K, N] (+ bias), W in the internal
INT4 layout (kernels/quant_ref.py: qweight [K/8, N] int32, scales/zeros [G, N], optional g_idx [K]).

No tl.dot and no padding of M to 16: each program owns block_n output features and a K range (split-K, see
gemv_tiles.py), loads block_k / 8 packed rows of block_n int32 (coalesced along N: 8 input features per word)
and accumulates x * (q - z) once per row of x (the weights are read once for all M rows). The dequant-GEMM
(triton_quant.int4_matmul) spends two conversions per weight and a 16-row MMA on one useful row: 9.8% of the
int4 roofline at batch 1; it stays the path of larger batches.

The kernel (MESHSERVE_INT4_GEMV=half, the default): words decoded as fp16 pairs in inline PTX: nibbles (j, j + 4)
of a word become one f16x2 with one LOP3 (1024 + q, or 1024 + 16q with x pre-divided by 16), one HSUB2 gives
the exact (q - z), one HFMA2 multiplies two weights by two x; each step's x is scaled so that its largest |x| is
32 (as the fp8 half GEMV: no activation can overflow the fp16 sums of 16 products), 2 words summed in fp16, then
fp32; the next step's words, scales, zeros and x are loaded before this step is decoded (Triton pipelines only
loads that feed tl.dot). Tiles 128 x 64 on one warp (168 registers, ~3.0 sm_90 instructions per weight; 3-4
rows 128 x 32, which do not spill), split-K for ~12 programs per SM, the partials summed by each column block's last program: measured on an H200
(2026-11-30, per Llama-3.1-8B layer at batch 1) 53.9 us against the bf16 GEMV's 121.1; ~5e-4 relative error.
Measured and removed the same day: magic (PRMT into the mantissa of 2^23, fp32: 73.2 us fused / 80.7), lop3
(LOP3 + FFMA, fp32: 60.1 / 79.7), the same kernel with a reduce kernel (79.0) and cvt (102.0, earlier).
Act-order weights sorted by group at load (layers/quantization/int4.py: K rows reordered by perm, no g_idx) run
the half kernel with HAS_PERM, x gathered through perm. Act-order g_idx (weights not sorted: row-parallel
slices, small groups) and groups smaller than a step run the grouped kernel: every weight dequantized in fp32 as
(q - z) * s with its own group's scale and zero (the former magic kernel's per-weight path: one PRMT per weight
puts the nibble's byte under the exponent of 2^23, one subtraction of 2^23 + z gives the exact q - z).

Split-K partials [S, M, N] are summed in split order 0, 1, ..., S - 1 from an fp32 workspace, by each column
block's last program to finish (an acq_rel counter per block) or, when no counter is at hand, by
gemv_tiles.split_k_reduce: the same fp32 additions in the same order, so the output's bits depend only on the
input and the tiles, never on which program finished last (greedy decoding stays reproducible, eager or in a
CUDA graph). Reference: quant_ref.int4_linear_ref (bit-exact weights; fp32 sums in another order).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from meshserve.kernels import pdl as pdl_mod
from meshserve.kernels.gemv_tiles import GemvTiles, split_k_range, split_k_reduce
from meshserve.kernels.pdl_jit import gdc_trigger_late, gdc_wait
from meshserve.kernels.triton_half2 import pack_half2

MAX_GEMV_ROWS = 4  # larger batches go to the dequant-GEMM, whose MMA then does useful work


@triton.jit
def _nibble_bytes(packed):
    """(even nibbles, odd nibbles), each nibble alone in a byte (two masks per word)."""
    w = packed.to(tl.uint32, bitcast=True)
    return w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F


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
def _nibble(even, odd, i: tl.constexpr, PRMT: tl.constexpr):
    """Nibble i of each word as the fp32 2^23 + q (the nibble's byte or-ed into the mantissa of 2^23; the
    caller subtracts 2^23 + z in one step). PRMT: one byte permute per weight takes byte i // 2 and
    the bytes of 0x4B000000 (the compiler's shift + bit-field extract + or are 3 ops; the interpreter has no
    inline PTX, so CPU tests run the shift-and-mask spelling of the same bits)."""
    src = even if i % 2 == 0 else odd
    if PRMT:  # d = [src.byte(i // 2), m.byte1, m.byte2, m.byte3] with m = 0x4B000000 (bytes 4..7)
        bits = _prmt_magic(src, i // 2)
    elif i >= 6:  # the top byte: the shift alone isolates it
        bits = (src >> 24) | 0x4B000000
    else:
        bits = ((src >> (8 * (i // 2))) & 0xFF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True)


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
def _arrive_last(cnt_ptr):
    """Count this program in its column block's counter: True for the block's last program to finish (the one that
    sums the partials). acq_rel: every partial stored before a count is visible to the program that sees the
    last count."""
    tl.debug_barrier()  # every thread's partial is stored before the count
    done = tl.atomic_add(cnt_ptr + tl.program_id(0), 1, sem="acq_rel", scope="gpu")
    return done == tl.num_programs(1) - 1


@triton.jit
def _int4_gemv_grouped_kernel(
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
    PRMT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
):
    """Act-order g_idx or groups smaller than a step: every weight with its own group's scale and zero (fp32)."""
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
        even, odd = _nibble_bytes(packed)
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
            z += 8388608.0  # 2^23 + z, exact: integers below 2^24
            step += ((_nibble(even, odd, i, PRMT) - z) * s)[None, :, :] * x[:, :, None]
        acc += tl.sum(step, 1)
    mask = mmask[:, None] & nmask[None, :]
    if SPLIT:
        part = part_ptr + rm[:, None] * N + rn[None, :]
        tl.store(part + pid_k * M * N, acc, mask=mask)
        if FUSED_REDUCE:  # the column block's last program to finish sums the partials: no reduce kernel
            last = _arrive_last(cnt_ptr)
            if last:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for s in range(tl.num_programs(1)):  # split order; .cg: from L2, where the others' stores are
                    acc += tl.load(part + s * M * N, mask=mask, other=0.0, cache_modifier=".cg")
                _store_y(acc, y_ptr, b_ptr, rm, rn, nmask, mask, stride_ym, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)  # zero again for the next call or graph replay
    else:
        _store_y(acc, y_ptr, b_ptr, rm, rn, nmask, mask, stride_ym, HAS_BIAS)


@triton.jit
def _step_loads(
    qw_ptr,
    s_ptr,
    z_ptr,
    p0,
    kp_hi,
    rp,
    rn,
    nmask,
    stride_qk,
    stride_sg,
    GROUP: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One K step's packed words [KP, BLOCK_N] and its group's scales and zero points [1, BLOCK_N] (fp32, 2-D so
    that they take the words' layout: no layout change in shared memory)."""
    pr = p0 + rp
    ptrs = qw_ptr + pr[:, None].to(tl.int64) * stride_qk + rn[None, :]
    # GROUP constexpr: a shift, no division (int32 offsets: G * N < 2^31)
    g_off = (p0 * 8 // GROUP) * stride_sg + rn[None, :]
    if EVEN:
        packed = tl.load(ptrs)
        s = tl.load(s_ptr + g_off)
        z = tl.load(z_ptr + g_off)
    else:
        valid = nmask[None, :] & ((p0 + 0 * rn[None, :]) < kp_hi)  # a tensor compare (the interpreter)
        packed = tl.load(ptrs, mask=(pr < kp_hi)[:, None] & nmask[None, :], other=0)
        s = tl.load(s_ptr + g_off, mask=valid, other=0.0)
        z = tl.load(z_ptr + g_off, mask=valid, other=0.0)
    return packed.to(tl.uint32, bitcast=True), s.to(tl.float32), z.to(tl.float32)


HALF_X_MAX = tl.constexpr(32.0)  # the half variant scales each step's x to this largest |x| (see _half_step)


def half_words_ptx(words: tuple[str, ...], zl: str, zh: str, xs: tuple[str, ...], out: str = "$0") -> str:
    """Inline PTX of packed int4 words against fp16 pairs of x, summed in one f16x2 and then in fp32 into out:
    nibbles (j, j + 4) of a word decode into one f16x2 with one LOP3 each (mask 0x000F000F: 1024 + q; mask
    0x00F000F0: 1024 + 16q, whose x is pre-divided by 16), one HSUB2 of zl = (1024 + z) or zh = (1024 + 16z)
    makes them the exact (q - z) or 16 (q - z), one HFMA2 sums: 13 instructions a word (8 weights), then the two
    fp16 halves added in fp32 (3 more). xs: four pair operands a word, (x0, x4), (x1, x5) / 16, (x2, x6),
    (x3, x7) / 16."""
    lines = [".reg .b32 t, u, a;", ".reg .f16 l, h;", ".reg .f32 fl, fh;"]
    for i, word in enumerate(words):
        xa, xb, xc, xd = xs[4 * i : 4 * i + 4]
        first = "mul.rn.f16x2 a, t, " + xa + ";" if i == 0 else "fma.rn.f16x2 a, t, " + xa + ", a;"
        lines += [f"lop3.b32 t, {word}, 0x000F000F, 0x64006400, 0xEA;", f"sub.f16x2 t, t, {zl};", first,
                  f"lop3.b32 t, {word}, 0x00F000F0, 0x64006400, 0xEA;", f"sub.f16x2 t, t, {zh};",
                  f"fma.rn.f16x2 a, t, {xb}, a;", f"shr.b32 u, {word}, 8;",
                  "lop3.b32 t, u, 0x000F000F, 0x64006400, 0xEA;", f"sub.f16x2 t, t, {zl};",
                  f"fma.rn.f16x2 a, t, {xc}, a;", "lop3.b32 t, u, 0x00F000F0, 0x64006400, 0xEA;",
                  f"sub.f16x2 t, t, {zh};", f"fma.rn.f16x2 a, t, {xd}, a;"]
    lines += ["mov.b32 {l, h}, a;", "cvt.f32.f16 fl, l;", "cvt.f32.f16 fh, h;", f"add.f32 {out}, fl, fh;"]
    return "{\n" + "\n".join(lines) + "\n}"


# two packed words (16 weights: K rows 2r and 2r + 1 of a column) against 8 fp16 pairs of x: 29 instructions
_HALF_WORDS_ASM = tl.constexpr(half_words_ptx(("$1", "$2"), "$3", "$4", tuple(f"${i}" for i in range(5, 13))))


@triton.jit
def _pairs(t):
    """t [2P, ...] -> (t[0::2], t[1::2]): rows 2r and 2r + 1 (in registers: a thread holds all rows)."""
    if len(t.shape) == 1:
        return tl.split(tl.reshape(t, [t.shape[0] // 2, 2]))
    else:
        return tl.split(tl.permute(tl.reshape(t, [t.shape[0] // 2, 2, t.shape[1]]), [0, 2, 1]))


@triton.jit
def _half_step(packed, s, z, x, acc, ASM: tl.constexpr):
    """acc [1, N] += s * sum over the step of (q - z) * x in packed fp16 (HFMA2: two weights an instruction):
    x of the step scaled so that its largest |x| is HALF_X_MAX, two words' 16 products per column summed in
    fp16 (8 products of |q - z| <= 15 and |x| <= 32 per half: < 4,000, far from fp16's 65,504 whatever x
    holds), those sums added in fp32 and the scale undone once per step. ASM: inline PTX (compiled code);
    else the same fp16 roundings spelled with tensors (the interpreter runs no inline PTX)."""
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), 1), 0), 1e-30)
    inv = HALF_X_MAX / amax
    xs = _split8(tl.reshape(x, [x.shape[0], 2, 2, 2]))
    wa, wb = _pairs(packed)
    if ASM:
        inv16 = inv * 0.0625  # the odd pairs' weights decode as 16 (q - z)
        pa0, pb0 = _pairs(pack_half2(xs[0] * inv, xs[4] * inv, ASM))
        pa1, pb1 = _pairs(pack_half2(xs[1] * inv16, xs[5] * inv16, ASM))
        pa2, pb2 = _pairs(pack_half2(xs[2] * inv, xs[6] * inv, ASM))
        pa3, pb3 = _pairs(pack_half2(xs[3] * inv16, xs[7] * inv16, ASM))
        zl = z + 1024.0
        zh = z * 16.0 + 1024.0
        part = tl.inline_asm_elementwise(
            _HALF_WORDS_ASM,
            "=f,r,r,r,r,r,r,r,r,r,r,r,r",
            [
                wa,
                wb,
                pack_half2(zl, zl, ASM),
                pack_half2(zh, zh, ASM),
                pa0[:, None],
                pa1[:, None],
                pa2[:, None],
                pa3[:, None],
                pb0[:, None],
                pb1[:, None],
                pb2[:, None],
                pb3[:, None],
            ],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    else:
        part = tl.zeros(wa.shape, dtype=tl.float32)
        for half in tl.static_range(2):  # the low halves: nibbles 0..3, the high halves: 4..7
            a = tl.zeros(wa.shape, dtype=tl.float16)
            for r in tl.static_range(2):  # rows 2r, 2r + 1
                w = wa if r == 0 else wb
                for j in tl.static_range(4):
                    i: tl.constexpr = j + 4 * half
                    w16 = (((w >> (4 * i)) & 15).to(tl.float32) - z) * (16.0 if j % 2 else 1.0)  # exact
                    xh = _pairs(xs[i] * (inv * (0.0625 if j % 2 else 1.0)))[r].to(tl.float16)
                    a += w16.to(tl.float16) * xh[:, None]  # fp16 products and sums
            part += a.to(tl.float32)
    return acc + tl.sum(part, 0, keep_dims=True) * (s * (amax / HALF_X_MAX))


@triton.jit
def _int4_gemv_half_kernel(
    x_ptr,
    qw_ptr,
    s_ptr,
    z_ptr,
    perm_ptr,
    b_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_qk,
    stride_sg,
    stride_ym,
    kp_per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr,
    EVEN: tl.constexpr,
    GROUP: tl.constexpr,
    ASM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KP: tl.constexpr,
    REDUCE_CHUNK: tl.constexpr,
    USE_GDC: tl.constexpr = False,
    HAS_PERM: tl.constexpr = False,
):
    """Steps inside one group (no g_idx, GROUP a multiple of the step): z and s per column and step. Under PDL
    (USE_GDC) the first step's words, scales and zeros are requested before the wait (no kernel writes them),
    x and every store after it (the split-K counters and partials of the launch before are then settled).
    HAS_PERM: act-order weights sorted by group at load (K row k of the weight is input feature perm[k]): x is
    gathered through perm, feature k of a step read at x[perm[k]]. The indices run two steps ahead of the
    decode (those of step i + 2 requested with step i + 1's x), so the gather's x load waits on no index load
    of its own iteration; the weights' loads and the prefetch are the plain path's."""
    pid_k = tl.program_id(1)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = rn < N
    rp = tl.arange(0, BLOCK_KP)
    kp_lo = pid_k * kp_per_split
    kp_hi = tl.minimum(K // 8, kp_lo + kp_per_split)
    # one fp32 accumulator [1, N] per row (2-D: the words' layout, no layout change in shared memory); each
    # thread holds its 4 columns' whole K step, so the sum over the step stays in registers
    acc0 = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    acc1 = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    acc3 = tl.zeros([1, BLOCK_N], dtype=tl.float32)
    # software pipeline by hand: step i + 1's words, scales, zeros and x (row 0) are in flight while step i is
    # decoded (Triton's num_stages pipelines only loads that feed tl.dot)
    packed, s, z = _step_loads(
        qw_ptr, s_ptr, z_ptr, kp_lo, kp_hi, rp, rn, nmask, stride_qk, stride_sg, GROUP, EVEN
    )
    r8 = tl.arange(0, 8)[None, :]
    xk0 = (kp_lo + rp)[:, None] * 8 + r8
    if HAS_PERM:  # the first two steps' indices (perm is a weight: no kernel writes it, so before the wait)
        idx = tl.load(perm_ptr + xk0, mask=xk0 < kp_hi * 8, other=0)
        nxt_idx = tl.load(perm_ptr + xk0 + BLOCK_KP * 8, mask=xk0 + BLOCK_KP * 8 < kp_hi * 8, other=0)
    gdc_wait(USE_GDC)  # x is the previous kernel's output
    if HAS_PERM:
        x0 = tl.load(x_ptr + idx, mask=xk0 < kp_hi * 8, other=0.0)
    else:
        x0 = tl.load(x_ptr + xk0, mask=xk0 < kp_hi * 8, other=0.0)
    for p0 in range(kp_lo, kp_hi, BLOCK_KP):
        nxt_packed, nxt_s, nxt_z = _step_loads(
            qw_ptr, s_ptr, z_ptr, p0 + BLOCK_KP, kp_hi, rp, rn, nmask, stride_qk, stride_sg, GROUP, False
        )
        xk = (p0 + rp)[:, None] * 8 + r8  # the step's features 8p + i, [KP, 8]
        xmask = xk < kp_hi * 8
        if HAS_PERM:  # the next step's x by the indices already here, the indices of the step after it
            nxt_x0 = tl.load(x_ptr + nxt_idx, mask=xk + BLOCK_KP * 8 < kp_hi * 8, other=0.0)
            nxt_idx = tl.load(
                perm_ptr + xk + 2 * BLOCK_KP * 8, mask=xk + 2 * BLOCK_KP * 8 < kp_hi * 8, other=0
            )
            if BLOCK_M > 1:  # the other rows' x of this step: its indices loaded again (L1), not carried
                xr = tl.load(perm_ptr + xk, mask=xmask, other=0)
        else:
            nxt_x0 = tl.load(
                x_ptr + xk + BLOCK_KP * 8, mask=xk + BLOCK_KP * 8 < kp_hi * 8, other=0.0
            )  # row 0 too
            xr = xk
        acc0 = _half_step(packed, s, z, x0, acc0, ASM)
        if BLOCK_M > 1:  # the weights decoded once per row: M <= 4 (the decode is the cost, not the loads)
            x = tl.load(x_ptr + stride_xm + xr, mask=xmask & (xk * 0 + 1 < M), other=0.0)
            acc1 = _half_step(packed, s, z, x, acc1, ASM)
        if BLOCK_M > 2:
            x = tl.load(x_ptr + 2 * stride_xm + xr, mask=xmask & (xk * 0 + 2 < M), other=0.0)
            acc2 = _half_step(packed, s, z, x, acc2, ASM)
        if BLOCK_M > 3:
            x = tl.load(x_ptr + 3 * stride_xm + xr, mask=xmask & (xk * 0 + 3 < M), other=0.0)
            acc3 = _half_step(packed, s, z, x, acc3, ASM)
        packed, s, z, x0 = nxt_packed, nxt_s, nxt_z, nxt_x0
    gdc_trigger_late(USE_GDC)
    rows = (
        tl.reshape(acc0, [BLOCK_N]),
        tl.reshape(acc1, [BLOCK_N]),
        tl.reshape(acc2, [BLOCK_N]),
        tl.reshape(acc3, [BLOCK_N]),
    )
    if SPLIT:
        for r in tl.static_range(BLOCK_M):
            tl.store(part_ptr + (pid_k * M + r) * N + rn, rows[r], mask=nmask & (rn * 0 + r < M))
        if FUSED_REDUCE:  # the column block's last program to finish sums the partials: no reduce kernel
            last = _arrive_last(cnt_ptr)
            if last:
                splits = tl.num_programs(1)
                for r in tl.static_range(BLOCK_M):
                    rmask = nmask & (rn * 0 + r < M)
                    # the partials added one by one in split order from +0 (split_k_reduce's fp32 additions,
                    # whoever sums): REDUCE_CHUNK loads at once (in flight together, not one L2 latency each);
                    # the masked tail adds +0.0, which changes no sum that started at +0
                    tot = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for s0 in range(0, splits, REDUCE_CHUNK):
                        for i in tl.static_range(REDUCE_CHUNK):
                            tot += tl.load(
                                part_ptr + ((s0 + i) * M + r) * N + rn,
                                mask=rmask & (rn * 0 + (s0 + i) < splits),
                                other=0.0,
                                cache_modifier=".cg",  # from L2, where the other programs' stores are
                            )
                    _store_row(tot, r, rn, rmask, y_ptr, b_ptr, stride_ym, HAS_BIAS)
                tl.atomic_xchg(cnt_ptr + tl.program_id(0), 0)  # zero again for the next call or graph replay
    else:
        for r in tl.static_range(BLOCK_M):
            _store_row(rows[r], r, rn, nmask & (rn * 0 + r < M), y_ptr, b_ptr, stride_ym, HAS_BIAS)


@triton.jit
def _store_row(v, r, rn, mask, y_ptr, b_ptr, stride_ym, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        v += tl.load(b_ptr + rn, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + r * stride_ym + rn, v.to(y_ptr.dtype.element_ty), mask=mask)


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


# one-warp programs of the half kernel an SM holds at once (65,536 registers / (registers a thread x 32)), by rows
# (and the perm gather at 2 rows): sm_90 code, 1 row 168 registers (with or without perm), 2 rows 196 (254 with perm)
_PER_SM_BY_ROWS = {(1, False): 12, (1, True): 12, (2, False): 10, (2, True): 8}


def default_int4_tiles(n: int, k: int, rows: int = 1, num_sms: int = 132, perm: bool = False) -> GemvTiles:
    """The half kernel: 128 columns on one warp (4 per lane: 128-bit loads along N), 64 features (8 packed rows) a
    step; split-K for at most 12 programs per SM (168 registers at one row: 12 one-warp programs fit an SM's
    register file: one wave), each at least 2 steps long. The H200 sweep of 2026-12-04 (tools/bench_quant_gemv.py,
    'half 128x64 w1 12/SM >=2 one wave chunk32', Llama-3.1-8B's projections at one row): 48.3 us a layer against
    53.6 with the rule before it (splits rounded up to >= 12 per SM, >= 4 steps each, reduce chunk 8): gate_up's 8
    splits made 1,792 programs for 1,584 slots (two waves: 24.0 -> 21.5 us at 7), and qkv / o, capped at 16 splits
    by the 4 steps, reach 3-6 programs per SM (8.6 / 6.9 -> 7.5 / 6.4 us at 32). 3-4 rows (untimed): 64-feature
    steps spill (sm_90: 368 bytes of stack at 4 rows), so 32-feature steps (174 registers: 11 programs per SM),
    the rule before. 2 rows (untimed): the one-wave rule at the programs an SM holds there (_PER_SM_BY_ROWS: 10,
    8 with the perm gather), not one row's 12."""
    if rows > 2:
        block_k, per_sm = 32, 11
        split = triton.cdiv(per_sm * num_sms, triton.cdiv(n, 128))
        return GemvTiles(128, block_k, split_k=max(1, min(split, k // (4 * block_k))), num_warps=1, num_stages=1)
    per_sm = _PER_SM_BY_ROWS[(max(rows, 1), perm)]
    split = max(1, min(per_sm * num_sms // triton.cdiv(n, 128), k // (2 * 64)))
    return GemvTiles(128, 64, split_k=split, num_warps=1, num_stages=1)


def default_int4_grouped_tiles(n: int, k: int, num_sms: int = 132) -> GemvTiles:
    """The grouped kernel (act-order, small groups): 128 x 32 on one warp, split-K for ~8 programs per SM (at least
    4 steps each). sm_90 code at one row: 216 registers, no spills, ~13 instructions per weight (a scale and a zero
    gathered and converted per weight); the magic kernel's 128 x 64 / 256 x 64 tiles this path ran before spill
    700+ bytes here (tools/int4_gemv_sass.py). Untimed: bench_quant_gemv.py's 'grouped' rows time it."""
    block_n, block_k = 128, 32
    split = max(1, min(triton.cdiv(8 * num_sms, triton.cdiv(n, block_n)), k // (4 * block_k)))
    return GemvTiles(block_n, block_k, split_k=split, num_warps=1, num_stages=1)


def int4_gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    tiles: GemvTiles | None = None,
    fused_reduce: bool = True,
    reduce_chunk: int = 32,
    pdl: bool | None = None,
    perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same as quant_ref.int4_linear_ref for x [..., K] of at most MAX_GEMV_ROWS rows -> [..., N] in x.dtype.
    fused_reduce=False sums split-K partials in a second kernel (the same bits: tests compare the two).
    reduce_chunk: partials the fused reduce of the half kernel loads at once (one L2 round trip each chunk; the
    same sums whatever the chunk; 32, the default since the H200 sweep of 2026-12-04: qkv / o / down 0.2-1.0 us
    faster each than 8). pdl: the PDL launch of the half kernel (None: the process switch, kernels/pdl.py); the
    grouped kernel launches plain. perm [K] (act-order weights sorted by group at load, no g_idx): the weight's
    K row k is input feature perm[k], i.e. the result is int4_linear_ref(x[..., perm], ...); the half kernel
    gathers x through it, the grouped kernel (groups smaller than the step) gets x permuted here."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    m = x2.shape[0]
    if x2.shape[1] != k or m > MAX_GEMV_ROWS:
        raise ValueError(f"int4_gemv takes <= {MAX_GEMV_ROWS} rows of {k} features, got {tuple(shape)}")
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    qweight, scales, zeros = qweight.contiguous(), scales.contiguous(), zeros.contiguous()
    if tiles is None:
        tiles = default_int4_tiles(n, k, m, perm=perm is not None)
        if g_idx is not None or group_size % tiles.block_k:  # groups of 32: half on the grouped tiles' 32
            tiles = default_int4_grouped_tiles(n, k)
    half = g_idx is None and group_size % tiles.block_k == 0  # else every weight with its own group's numbers
    if perm is not None:
        if g_idx is not None:
            raise ValueError("int4_gemv: perm sorts act-order weights by group; it takes no g_idx")
        if half:
            perm = perm.contiguous()
        else:  # the grouped kernel has no gather
            x2, perm = x2.index_select(1, perm), None
    if tiles.block_k % (16 if half else 8):  # half: packed rows in pairs
        raise ValueError(f"int4_gemv: block_k {tiles.block_k} is not whole packed rows (pairs for half)")
    per_split, splits = split_k_range(k, tiles)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if splits > 1 else y
    counters = (
        _split_counters(x.device, triton.cdiv(n, tiles.block_n)) if splits > 1 and fused_reduce else None
    )
    grid = (triton.cdiv(n, tiles.block_n), splits)
    common = {
        "HAS_BIAS": bias is not None,
        "SPLIT": splits > 1,
        "FUSED_REDUCE": counters is not None,
        "BLOCK_M": triton.next_power_of_2(m),
        "BLOCK_N": tiles.block_n,
        "BLOCK_KP": tiles.block_k // 8,
        "num_warps": tiles.num_warps,
    }
    ptrs = (bias if bias is not None else y, y, partials, counters if counters is not None else qweight)
    strides = (x2.stride(0), qweight.stride(0), scales.stride(0), y.stride(0), per_split // 8)
    if m and half:
        _int4_gemv_half_kernel[grid](
            x2,
            qweight,
            scales,
            zeros,
            perm if perm is not None else qweight,
            *ptrs,
            m,
            n,
            k,
            *strides,
            EVEN=n % tiles.block_n == 0 and k % per_split == 0,
            GROUP=group_size,
            ASM=x.is_cuda and not pdl_mod.interpreting(),
            REDUCE_CHUNK=reduce_chunk,
            HAS_PERM=perm is not None,
            num_stages=1,
            **common,
            **pdl_mod.gdc_kwargs(x, pdl, programs=grid[0] * grid[1], num_warps=tiles.num_warps),
        )
    elif m:
        _int4_gemv_grouped_kernel[grid](
            x2,
            qweight,
            scales,
            zeros,
            g_idx if g_idx is not None else qweight,
            *ptrs,
            m,
            n,
            k,
            group_size,
            *strides,
            HAS_G_IDX=g_idx is not None,
            PRMT=x.is_cuda and not pdl_mod.interpreting(),
            num_stages=tiles.num_stages,
            **common,
        )
    if m and splits > 1 and counters is None:
        split_k_reduce(partials, y, None, bias)
    return y.reshape(*shape[:-1], n)
