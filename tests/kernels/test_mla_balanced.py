"""The balanced MLA decode kernel (kernels/triton_mla_balanced.py) equals the reference (mla_decode_ref): in the
Triton interpreter with few programs, so ranges cut sequences (several pieces, a piece of overhead only) and
programs walk several sequences; padding rows (seq_len 0) give zeros; on the GPU (`-m gpu`) at V2-Lite's shapes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.mla_ref import mla_decode_ref
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90
from tests.kernels.test_mla import _meta

_HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _check(heads, rank, rope, seq_lens, num_programs, dtype, device, atol, block_size=4, tile=None, prefetch=False,
           transposed=False):
    from meshserve.kernels.triton_mla_balanced import mla_decode_balanced

    g = torch.Generator().manual_seed(0)
    q_lens = [1] * len(seq_lens)
    num_blocks = sum(-(-max(s, 1) // block_size) for s in seq_lens) + 2
    meta = _meta(q_lens, [max(s, 1) for s in seq_lens], block_size, num_blocks, device)
    meta.seq_lens = torch.tensor(seq_lens, device=device)  # padding rows: length 0
    meta.seq_lens_cpu = list(seq_lens)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    cache = rnd(1, num_blocks, block_size, 1, rank + rope)
    q_lat, q_pe = rnd(len(seq_lens), heads, rank), rnd(len(seq_lens), heads, rope)
    got = mla_decode_balanced(q_lat, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3,
                              num_programs=num_programs, tile=tile, prefetch=prefetch,
                              transposed=transposed)
    expected = mla_decode_ref(q_lat, q_pe, cache, meta, 0.3)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)


# 40 programs in the interpreter take 3-4 s each: the plain loop keeps that case in the default suite, the
# prefetch and transposed loops run it with -m slow (their 1/3/7-program cases stay)
_SLOW_40 = [pytest.param(40, loop, marks=pytest.mark.slow) for loop in ("prefetch", "transposed")]


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the Triton interpreter on CPU (on a GPU: the -m gpu test)")
@pytest.mark.parametrize(("num_programs", "loop"),
                         [(n, loop) for n in (1, 3, 7) for loop in ("plain", "prefetch", "transposed")]
                         + [(40, "plain"), *_SLOW_40])
def test_balanced_decode_in_interpreter(num_programs, loop):
    # 20 heads: two head blocks; lengths from one tile to many, padding rows (seq_len 0) between and at the end
    # (they own no piece: a program walking past one must not write a workspace slot for it); 40 programs:
    # more than the cost units, so some ranges hold only a sequence's overhead and some are empty; prefetch:
    # the loop that loads a tile ahead must stop at its piece's end (the next tile is another program's)
    _check(20, 32, 8, [70, 1, 0, 0, 33, 130, 5, 0], num_programs, torch.float32, "cpu", 1e-5, tile=(16, 4, 1),
           prefetch=loop == "prefetch", transposed=loop == "transposed")


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("num_programs", [None, 5, 264])
def test_balanced_decode_gpu(num_programs):
    import random

    r = random.Random(0)
    lens = [r.randint(100, 2048) for _ in range(200)] + [0, 1, 17, 4000]
    _check(16, 512, 64, lens, num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16)
    _check(128, 512, 64, lens[:20], num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16)
    for tile in (None, (16, 4, 1), (32, 8, 1)):  # the prefetching loop (kernels/triton_mla_prefetch.py)
        _check(16, 512, 64, lens, num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16, tile=tile, prefetch=True)
    _check(16, 512, 64, lens, num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16, transposed=True)


_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_mla_balanced import _mla_balanced_kernel, _mla_balanced_merge_kernel


sig = {n: "*bf16" for n in ("ql_ptr", "qp_ptr", "cache_ptr", "out_ptr")}
sig.update(bt_ptr="*i64", seq_lens_ptr="*i64", qsl_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
           pieces_ptr="*i32", scale_log2="fp32")
const = dict(NUM_HEADS=16, BLOCK_H=16, RANK=512, BLOCK_R=512, ROPE=64, BLOCK_P=64, BLOCK_SIZE=16, BLOCK_N=32,
             BLOCK_B=256, OVERHEAD_UNITS=2, UPCAST_DOT=False, DOT_PRECISION="tf32", PREFETCH=False, TRANSPOSED=False)
k = compile_sm90(_mla_balanced_kernel, sig, const, 8, 2)
assert k.metadata.shared <= 227 * 1024, k.metadata.shared
for block_n, warps in ((32, 4), (16, 4)):  # the prefetching loop, without the pipeliner
    k = compile_sm90(_mla_balanced_kernel, sig, {**const, "BLOCK_N": block_n, "PREFETCH": True}, warps, 1)
    assert k.metadata.shared <= 227 * 1024, k.metadata.shared
# the transposed loop: wgmma for all three dots, the latent tile double-buffered in shared memory
k = compile_sm90(_mla_balanced_kernel, sig, {**const, "BLOCK_N": 64, "TRANSPOSED": True}, 4, 2)
assert k.metadata.shared <= 227 * 1024, k.metadata.shared
assert k.asm["ptx"].count("wgmma.mma_async") > 0 and "memdesc<2x64x512xbf16" in k.asm["ttgir"]
print("balanced shared", k.metadata.shared, "cp.async", "cp.async" in k.asm["ptx"])
sig = dict(ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", pieces_ptr="*i32", qsl_ptr="*i64", out_ptr="*bf16")
compile_sm90(_mla_balanced_merge_kernel, sig, dict(NUM_HEADS=16, RANK=512, BLOCK_R=512, BLOCK_B=256), 4, 1)
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_balanced_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)
