"""Packed fp16 pairs for the quantized GEMVs' inline PTX (kernels/triton_int4_gemv.py, kernels/triton_fp8_gemv.py):
two fp32 tensors rounded to fp16 into the uint32 that HMUL2 / HFMA2 take, one cvt.rn.f16x2.f32 (F2FP) per pair;
the interpreter (no inline PTX) spells the same bits with tensor casts."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def pack_half2(lo, hi, ASM: tl.constexpr):
    """fp32 lo, hi -> the uint32 of the fp16 pair (lo in bits 0-15), one cvt.rn.f16x2.f32 (F2FP)."""
    if ASM:
        return tl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,f,f", [lo, hi], dtype=tl.uint32, is_pure=True, pack=1
        )
    else:
        lo16 = lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        hi16 = hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
        return lo16 | (hi16 << 16)
