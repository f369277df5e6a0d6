"""Batch-1 GEMVs of quantized weights (kernels/triton_fp8_gemv.py, kernels/triton_int4_gemv.py, the split-K
reduce of kernels/gemv_tiles.py) against kernels/quant_ref.py: every variant and both the masked and the
unmasked (EVEN) code, with and without split-K, in the Triton interpreter without CUDA; the same kernels
compiled to sm_90 code with Triton's bundled ptxas (the int4 PRMT inline PTX only runs there); `-m gpu` at
Llama-3.1-8B's shapes, and the dispatch of quant_ops.
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch

from meshserve.kernels.quant_ref import (
    FP8_DTYPE,
    fp8_weight_only_ref,
    int4_dequant_ref,
    int4_linear_ref,
    pack_int4_rows,
    quantize_fp8_per_channel,
    quantize_int4_groups,
)
from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu

FP8_VARIANTS = ("cvt", "bits", "dot", "half")
LLAMA_8B_SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]  # (N, K): qkv, o, gate_up, down


def _every_e4m3_pattern() -> torch.Tensor:
    """The 254 finite float8_e4m3fn values (zeros, subnormals, +-448) as a tensor of that dtype."""
    bits = torch.arange(256, dtype=torch.int32)
    return bits[(bits & 0x7F) != 0x7F].to(torch.uint8).view(FP8_DTYPE)


def _fp8_case(n, k, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, generator=g))
    pattern = _every_e4m3_pattern()
    wq[0, : min(k, pattern.numel())] = pattern[:k]
    x, bias = torch.randn(1, k, generator=g), torch.randn(n, generator=g)
    return wq.to(device), ws.to(device), x.to(device), bias.to(device)


# ----------------------------------------------------------------------------------------------------------
# interpreter
# ----------------------------------------------------------------------------------------------------------
@interp
@pytest.mark.parametrize("variant", FP8_VARIANTS)
@pytest.mark.parametrize(
    "n,k,tiles",
    [
        (40, 600, None),  # the default tiles, every mask on (N and K not multiples of the tile)
        (40, 600, (16, 64, 3)),  # split-K: 3 partial sums and the reduce pass
        (32, 512, (16, 128, 2)),  # EVEN: no masks
    ],
)
def test_fp8_gemv_variants_interp(variant, n, k, tiles):
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    wq, ws, x, bias = _fp8_case(n, k, seed=n + k)
    # fp16 activations: the dot variant rounds x to fp16, exact for fp16 x, so every variant must give the
    # reference's fp32 sum, rounded once to fp16 (up to the order of the fp32 additions; half rounds its
    # products to fp16: ~5e-4 relative, inside one fp16 output ulp or two)
    x, bias = x.half(), bias.half()
    t = GemvTiles(*tiles[:2], split_k=tiles[2]) if tiles else None
    y = fp8_gemv(x, wq, ws, bias, variant=variant, tiles=t)
    ref = fp8_weight_only_ref(x, wq, ws, bias)
    assert y.shape == (1, n) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-3, atol=2e-3 * ref.abs().max().item())


@interp
def test_fp8_gemv_half_survives_outlier_activations():
    # massive activations (thousands at a few features of a projection input) must not overflow the half
    # variant's fp16 products: its per-step scale keeps max |x| at 32 (a fixed x / 64 gave inf past ~2,300)
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    wq, ws, x, bias = _fp8_case(32, 512, seed=7)
    x = x.bfloat16()
    x[0, 5], x[0, 300] = 30000.0, -4096.0
    y = fp8_gemv(x, wq, ws, None, variant="half", tiles=GemvTiles(16, 128, split_k=2))
    ref = fp8_weight_only_ref(x, wq, ws, None)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=2e-3 * ref.abs().max().item())


@interp
def test_fp8_gemv_bits_decodes_every_e4m3_value_exactly():
    # weight row n holds e4m3 pattern n in column 0; x = e_0 and scale 1: y[n] is the decoded value itself
    # (the integer re-biasing, the 2^64 and 2^56 factors are exact), subnormals and signed zeros included
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    pattern = _every_e4m3_pattern()
    w = torch.zeros(pattern.numel(), 8, dtype=FP8_DTYPE)
    w[:, 0] = pattern
    x = torch.zeros(1, 8)
    x[0, 0] = 1.0
    y = fp8_gemv(x, w, torch.ones(pattern.numel()), variant="bits", tiles=GemvTiles(16, 8))
    assert torch.equal(y[0], pattern.float())


@interp
@pytest.mark.parametrize("variant", ["magic", "cvt", "lop3", "half"])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize(
    "group,act_order,tiles",
    [
        (64, False, (32, 64, 3)),  # a K step inside one group: z and s per column, split-K
        (64, False, (32, 64, 3, True)),  # the same, the partials summed by each column block's last program
        (64, False, (64, 64, 1)),  # the same without split-K (bias added in the kernel)
        (32, False, None),  # groups smaller than the step: per-weight scales and zeros
        (64, True, (32, 32, 2, True)),  # act-order g_idx (fused split-K reduce)
    ],
)
def test_int4_gemv_interp(variant, m, group, act_order, tiles):
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    k, n = 256, 80  # N not a multiple of the tile: masked columns
    g = torch.Generator().manual_seed(m * 100 + group)
    q, scales, zeros = quantize_int4_groups(torch.randn(n, k, generator=g), group)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if act_order else None
    qweight, scales, zeros = pack_int4_rows(q), scales.half(), zeros.half()
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    t = GemvTiles(*tiles[:2], split_k=tiles[2]) if tiles else None
    fused = bool(tiles and len(tiles) > 3)
    ref = int4_linear_ref(x, qweight, scales, zeros, group, g_idx, bias)
    for _ in range(2 if fused else 1):  # fused: the counters are zero again for the next call
        y = int4_gemv(
            x, qweight, scales, zeros, group, g_idx, bias, variant=variant, tiles=t, fused_reduce=fused
        )
        assert y.shape == (m, n)
        tol = 2e-3 * ref.abs().max().item() if variant == "half" and not act_order and group >= 32 else 1e-4
        torch.testing.assert_close(y, ref, atol=tol, rtol=1e-4 if tol == 1e-4 else 2e-3)
    if fused:
        assert not _counters_in_use()


@interp
@pytest.mark.parametrize(
    "m,n,k,group,tiles,fused",
    [
        (1, 64, 256, 64, (32, 32, 2, 1), True),  # EVEN: no masks (whole tiles and ranges), bias in the reduce
        (4, 64, 256, 64, (32, 32, 2, 1), False),  # EVEN, four rows, the two-kernel reduce
        # 10 partials: two chunks of the fused reduce; 4 steps a group
        (2, 48, 640, 128, (32, 32, 10, 2), True),
        # groups smaller than the step: the magic kernel, same numbers
        (3, 40, 256, 16, (32, 32, 2, 1), True),
    ],
)
@pytest.mark.parametrize("variant", ["lop3", "half"])
def test_int4_gemv_lop3_paths_interp(variant, m, n, k, group, tiles, fused):
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    g = torch.Generator().manual_seed(n + k + m)
    q, scales, zeros = quantize_int4_groups(torch.randn(n, k, generator=g), group)
    qweight, scales, zeros = pack_int4_rows(q), scales.half(), zeros.half()
    x, bias = torch.randn(m, k, generator=g).half(), torch.randn(n, generator=g).half()
    t = GemvTiles(tiles[0], tiles[1], split_k=tiles[2], num_warps=tiles[3])
    ref = int4_linear_ref(x.float(), qweight, scales, zeros, group, None, bias.float())
    y = int4_gemv(x, qweight, scales, zeros, group, None, bias, variant=variant, tiles=t, fused_reduce=fused)
    assert y.shape == (m, n) and y.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=2e-3)
    assert not _counters_in_use()


@interp
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemv_half_survives_outlier_activations(act_order):
    # the half variant's fp16 products: each step's x scaled to max |x| 32, so massive activations (thousands at
    # a few features) neither overflow nor swamp the step; act-order runs the magic kernel (fp32)
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    k, n, group = 512, 64, 128
    g = torch.Generator().manual_seed(3)
    q, scales, zeros = quantize_int4_groups(torch.randn(n, k, generator=g), group)
    g_idx = (torch.arange(k) // group)[torch.randperm(k, generator=g)].to(torch.int32) if act_order else None
    qweight, scales, zeros = pack_int4_rows(q), scales.half(), zeros.half()
    x = torch.randn(2, k, generator=g).bfloat16()
    x[0, 5], x[0, 300], x[1, 40] = 30000.0, -4096.0, 60000.0
    y = int4_gemv(x, qweight, scales, zeros, group, g_idx, variant="half", tiles=GemvTiles(64, 32, 3, 1))
    ref = int4_linear_ref(x.float(), qweight, scales, zeros, group, g_idx)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=2e-3 * ref.abs().max().item())


@interp
def test_int4_lop3_decodes_every_nibble_exactly():
    # x = e_k and scale 1: y[n] is q[n, k] - z[n] itself, for every nibble position of a word (k = 0..7 and the
    # word's shifted half), every q 0..15 and zero points 0..15
    from meshserve.kernels.gemv_tiles import GemvTiles
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    n, k = 256, 32
    q = (torch.arange(k)[:, None] + torch.arange(n)[None, :]) % 16  # [K, N]
    zeros = (torch.arange(n) // 16).float()[None, :]
    qweight, tiles = pack_int4_rows(q.to(torch.int32)), GemvTiles(128, 32, num_warps=1)
    for kk in range(8, 16):
        x = torch.zeros(1, k)
        x[0, kk] = 1.0
        y = int4_gemv(x, qweight, torch.ones(1, n), zeros, k, variant="lop3", tiles=tiles)
        assert torch.equal(y[0], q[kk].float() - zeros[0]), kk


def _counters_in_use() -> bool:
    from meshserve.kernels.triton_int4_gemv import _counters

    return any(bool(c.any()) for c in _counters.values())


@interp
def test_int4_gemv_takes_at_most_four_rows():
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    q, scales, zeros = quantize_int4_groups(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="<= 4 rows"):
        int4_gemv(torch.randn(5, 64), pack_int4_rows(q), scales, zeros, 32)


_COMPILE_SM90 = """
import os, re, subprocess, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels import gemv_tiles, triton_fp8_gemv as f8, triton_int4_gemv as i4

def compile(kernel, pointers, const, warps):
    # returns the compiled kernel (its cubin in .asm)
    names = list(kernel.arg_names)
    sig = {n: "i32" for n in names}
    sig.update(pointers)
    sig.update({n: "constexpr" for n in const})
    # what a launch at the 8B shapes specializes: 16-aligned pointers, sizes and strides (vectorized loads)
    aligned = set(pointers) | {"N", "K", "stride_w", "stride_qk", "stride_sg", "stride_ym", "k_per_split", "magic"}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 3})

p = dict(x_ptr="*bf16", w_ptr="*fp8e4nv", s_ptr="*fp32", b_ptr="*bf16", out_ptr="*bf16")
for (name, kernel), even, split in zip(f8._KERNELS.items(), (True, False, True, True), (False, True, True, False)):
    t = f8.default_fp8_tiles(name, 4096, 4096)
    compile(kernel, {**p, "w_ptr": "*i32"} if name == "bits" else p,
            dict(HAS_BIAS=True, SPLIT=split, EVEN=even, BLOCK_N=t.block_n, BLOCK_K=t.block_k), t.num_warps)
p = dict(x_ptr="*bf16", qw_ptr="*i32", s_ptr="*fp16", z_ptr="*fp16", g_ptr="*i32", b_ptr="*bf16", y_ptr="*bf16",
         part_ptr="*fp32", cnt_ptr="*i32")
for magic, uniform, m, fused in ((True, True, 1, True), (False, True, 4, False), (True, False, 2, False)):
    compile(i4._int4_gemv_kernel, p, dict(HAS_G_IDX=not uniform, HAS_BIAS=True, SPLIT=m < 4, FUSED_REDUCE=fused,
            GROUP_UNIFORM=uniform, MAGIC=magic, PRMT=magic, BLOCK_M=m, BLOCK_N=256, BLOCK_KP=8), 2)
p.pop("g_ptr")
# (half, rows, EVEN, packed rows a step): the default 4 at 1, 2 and 4 rows, and the sweep's 8 at one row
cases = [(h, m, m != 2, 4) for h in (False, True) for m in (1, 2, 4)] + [(False, 1, True, 8), (True, 1, True, 8)]
for half, m, even, kp in cases:  # no spills (stack 0), any rows, the default and the 64-feature steps
    k = compile(i4._int4_gemv_lop3_kernel, p, dict(HAS_BIAS=True, SPLIT=True, FUSED_REDUCE=even, EVEN=even,
                GROUP=128, HALF=half, HALF_ASM=half, BLOCK_M=m, BLOCK_N=128, BLOCK_KP=kp, REDUCE_CHUNK=8), 1)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(k.asm["cubin"])
        f.flush()
        use = subprocess.run([os.path.join(os.path.dirname(triton.__file__), "backends/nvidia/bin/cuobjdump"),
                              "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    assert re.search(r"STACK:0 .*LOCAL:0", use), (half, m, kp, use)
compile(gemv_tiles._split_k_reduce_kernel, dict(part_ptr="*fp32", s_ptr="*fp32", b_ptr="*bf16", y_ptr="*bf16"),
        dict(HAS_SCALE=True, HAS_BIAS=True, BLOCK=1024), 4)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU (-m gpu): Llama-3.1-8B's projections
# ----------------------------------------------------------------------------------------------------------
@functools.cache
def _gpu_fp8_case(n, k):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, device="cuda", generator=g) * 0.02)
    wq[0, :254] = _every_e4m3_pattern().cuda()
    return wq, ws


@functools.cache
def _gpu_int4_case(n, k, act_order):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    q, scales, zeros = quantize_int4_groups(torch.randn(n, k, device="cuda", generator=g), 128)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(k)).cuda()
    g_idx = (torch.arange(k, device="cuda") // 128)[perm].int() if act_order else None
    return pack_int4_rows(q), scales.half(), zeros.half(), g_idx


@gpu
@pytest.mark.parametrize("variant", FP8_VARIANTS)
@pytest.mark.parametrize("n,k", LLAMA_8B_SHAPES + [(1027, 4000)])
def test_fp8_gemv_gpu(variant, n, k):
    from meshserve.kernels.triton_fp8_gemv import fp8_gemv

    wq, ws = _gpu_fp8_case(n, k)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) if n == 1027 else None
    y = fp8_gemv(x, wq, ws, bias, variant=variant)
    ref = fp8_weight_only_ref(x.float(), wq, ws, bias)
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=2e-2)


@gpu
@pytest.mark.parametrize(
    "variant", ["magic", "magic_fused", "cvt", "lop3", "lop3_fused", "half", "half_fused"]
)
@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("n,k", LLAMA_8B_SHAPES)
@pytest.mark.parametrize("act_order", [False, True])
def test_int4_gemv_gpu(variant, m, n, k, act_order):
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    qweight, scales, zeros, g_idx = _gpu_int4_case(n, k, act_order)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    kernel, _, fused = variant.partition("_")
    y = int4_gemv(x, qweight, scales, zeros, 128, g_idx, variant=kernel, fused_reduce=bool(fused))
    # the GEMV dequantizes exactly in fp32 (no bf16 rounding of the weight): an fp32 oracle
    ref = x.float() @ int4_dequant_ref(qweight, scales, zeros, 128, g_idx, dtype=torch.float32)
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)
    assert not _counters_in_use()


@gpu
@pytest.mark.parametrize("variant", ["magic", "lop3", "half"])
def test_int4_gemv_fused_reduce_in_a_cuda_graph_gpu(variant):
    # replayed many times, new inputs each time: the last program of each column block sums the partials of that
    # replay (counters zeroed by it), the same numbers as the two-kernel reduce
    from meshserve.kernels.triton_int4_gemv import int4_gemv

    k, n = 14336, 4096
    qweight, scales, zeros, _ = _gpu_int4_case(n, k, False)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    int4_gemv(x, qweight, scales, zeros, 128, variant=variant, fused_reduce=True)  # warm: compile, counters
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_gemv(x, qweight, scales, zeros, 128, variant=variant, fused_reduce=True)
    for seed in range(5):
        x.copy_(torch.randn(1, k, generator=torch.Generator().manual_seed(seed)).to(x))
        graph.replay()
        torch.cuda.synchronize()
        # lop3 / half: the fused reduce sums 8 partials at a time (another fp32 order than the reduce kernel's)
        expected = int4_gemv(x, qweight, scales, zeros, 128, variant=variant)
        if variant == "magic":
            assert torch.equal(y, expected), seed
        else:
            torch.testing.assert_close(y, expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)
    assert not _counters_in_use()


@gpu
def test_quant_ops_dispatch_gpu():
    from meshserve.kernels import quant_ops, triton_fp8_gemv, triton_int4_gemv, triton_quant

    k, n = 4096, 6144
    qweight, scales, zeros, _ = _gpu_int4_case(n, k, False)
    for m, variant, kernel in [
        (1, "magic", "gemv"),
        (2, "magic_fused", "gemv"),
        (4, "cvt", "gemv"),
        (1, "lop3", "gemv"),
        (3, "half_fused", "gemv"),
        (1, "matmul", "mm"),
        (8, "magic", "mm"),
    ]:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        y = quant_ops.int4_linear(x, qweight, scales, zeros, 128, None, None, fast=True, gemv_variant=variant)
        if kernel == "gemv":  # the GEMV of that variant and reduce pass
            name, _, fused = variant.partition("_")
            expected = triton_int4_gemv.int4_gemv(
                x, qweight, scales, zeros, 128, variant=name, fused_reduce=bool(fused)
            )
        else:
            expected = triton_quant.int4_matmul(x, qweight, scales, zeros, 128)
        assert torch.equal(y, expected), (m, variant)
    wq, ws = quantize_fp8_per_channel(torch.randn(n, k, device="cuda") * 0.02)
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    for variant in FP8_VARIANTS:
        y = quant_ops.fp8_linear(x, wq, ws, None, None, gemv=True, gemv_variant=variant)
        assert torch.equal(y, triton_fp8_gemv.fp8_gemv(x, wq, ws, variant=variant))
    # scaled_mm: the row quantized per token, then cuBLASLt (the semantics of fp8_linear_ref, not weight-only)
    y = quant_ops.fp8_linear(x, wq, ws, None, None, gemv=True, gemv_variant="scaled_mm")
    ref = quant_ops.fp8_linear_ref(x.float(), wq, ws)
    torch.testing.assert_close(y.float(), ref, atol=3e-2 * ref.abs().max().item(), rtol=2e-2)
