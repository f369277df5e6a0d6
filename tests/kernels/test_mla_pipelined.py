"""The pipelined MLA decode loop (kernels/triton_mla_pipelined.py: block ids a tile ahead) equals the reference
(mla_decode_ref) in both decode kernels: in the Triton interpreter on CPU (the balanced kernel with few
programs, so ranges cut sequences and walk several; the split kernel with several splits; tiles spanning
several cache blocks, padding rows, two head blocks), compiled for sm_90 without a GPU (the latent tile gets
num_stages - 1 shared buffers, where the plain loop gets one), and on the GPU (`-m gpu`) at V2-Lite's shapes,
inside a CUDA graph too."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.mla_ref import mla_decode_ref
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90
from tests.kernels.test_mla import _check_triton, _meta

_HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interpreter_only = pytest.mark.skipif(_HAS_CUDA, reason="the Triton interpreter on CPU (on a GPU: the -m gpu test)")


def _inputs(heads, rank, rope, seq_lens, dtype, device, block_size, seed=0):
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-max(s, 1) // block_size) for s in seq_lens) + 2
    meta = _meta([1] * len(seq_lens), [max(s, 1) for s in seq_lens], block_size, num_blocks, device, seed=seed)
    meta.seq_lens = torch.tensor(seq_lens, device=device)  # padding rows: length 0
    meta.seq_lens_cpu = list(seq_lens)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return meta, rnd(1, num_blocks, block_size, 1, rank + rope), rnd(len(seq_lens), heads, rank), rnd(
        len(seq_lens), heads, rope)


def _check_balanced(heads, rank, rope, seq_lens, num_programs, dtype, device, atol, block_size=4, tile=None):
    from meshserve.kernels.triton_mla_balanced import mla_decode_balanced

    meta, cache, q_lat, q_pe = _inputs(heads, rank, rope, seq_lens, dtype, device, block_size)
    got = mla_decode_balanced(q_lat, q_pe, cache, meta.block_tables, meta.seq_lens, meta.query_start_loc, 0.3,
                              num_programs=num_programs, tile=tile, pipelined=True)
    expected = mla_decode_ref(q_lat, q_pe, cache, meta, 0.3)
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)


@needs_triton
@interpreter_only
@pytest.mark.parametrize("num_programs", [1, 3, 7, 40])
def test_pipelined_balanced_decode_in_interpreter(num_programs):
    # as test_mla_balanced: lengths from one tile to many, padding rows between and at the end, 40 programs
    # for ranges of overhead only and empty ones; tiles of 16 rows over blocks of 4 (four blocks a tile: the
    # block ids read a tile ahead belong to the next tile, the last one's to the next program's piece)
    _check_balanced(20, 32, 8, [70, 1, 0, 0, 33, 130, 5, 0], num_programs, torch.float32, "cpu", 1e-5,
                    tile=(16, 4, 3))


@needs_triton
@interpreter_only
@pytest.mark.parametrize("seq_lens", [[1], [16, 17, 15], [3, 200, 64, 65, 1, 90, 31, 32, 33, 48, 47, 2]])
def test_pipelined_balanced_decode_batches_in_interpreter(seq_lens):
    # several batch sizes and ragged contexts at one head block, blocks of 16 rows (the engine's), the default
    # program count of the launcher's rule (2 an SM on the interpreter's 1 "SM")
    _check_balanced(16, 32, 16, seq_lens, None, torch.float32, "cpu", 1e-5, block_size=16, tile=(16, 4, 3))


@needs_triton
@interpreter_only
@pytest.mark.parametrize("num_splits", [1, 3])
def test_pipelined_split_decode_in_interpreter(num_splits):
    # the split kernel (batches under BALANCED_MIN_SEQS) with the pipelined loop: 20 heads, contexts crossing
    # several tiles of 16 rows over blocks of 4, a split's last tile followed by the next split's
    _check_triton(20, 32, 8, [1, 70, 33], torch.float32, "cpu", num_splits, block_size=4, pipelined=True,
                  tile=(16, 4, 3))


def test_pipelined_programs_fit_the_sm():
    """The launcher's programs per SM: two of the default tile (94 KB of shared memory each, 4 warps at 255
    registers), one of a 64-row tile with 8 warps, at V2-Lite's shapes (bf16, 16 heads, 512 + 64)."""
    from meshserve.kernels.triton_mla_pipelined import PIPELINED_TILE, pipelined_programs_per_sm

    fit = lambda tile: pipelined_programs_per_sm(tile, 16, 512, 64, 2)  # noqa: E731
    assert fit(PIPELINED_TILE) == 2
    assert fit((16, 4, 4)) == 2 and fit((64, 8, 3)) == 1 and fit((32, 4, 4)) == 1 and fit((32, 8, 3)) == 1


_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
import re
from meshserve.kernels.triton_mla import _mla_decode_split_kernel
from meshserve.kernels.triton_mla_balanced import _mla_balanced_kernel
from meshserve.kernels.triton_mla_pipelined import PIPELINED_TILE, pipelined_smem_bytes


def latent_buffers(k):
    return {int(n) for n in re.findall(r"memdesc<(\\d+)x\\d+x512xbf16", k.asm["ttgir"])}

sig = {n: "*bf16" for n in ("ql_ptr", "qp_ptr", "cache_ptr", "out_ptr")}
sig.update(bt_ptr="*i64", seq_lens_ptr="*i64", qsl_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
           pieces_ptr="*i32", scale_log2="fp32")
const = dict(NUM_HEADS=16, BLOCK_H=16, RANK=512, BLOCK_R=512, ROPE=64, BLOCK_P=64, BLOCK_SIZE=16, BLOCK_N=32,
             BLOCK_B=256, OVERHEAD_UNITS=2, UPCAST_DOT=False, DOT_PRECISION="tf32", PREFETCH=False, TRANSPOSED=False,
             PIPELINED=False)
plain = compile_sm90(_mla_balanced_kernel, sig, const, 4, 3)
assert latent_buffers(plain) == {1}, latent_buffers(plain)  # why the plain loop does not overlap its loads
for block_n, warps, stages in (PIPELINED_TILE, (16, 4, 4), (64, 8, 3)):
    k = compile_sm90(_mla_balanced_kernel, sig, {**const, "BLOCK_N": block_n, "PIPELINED": True}, warps, stages)
    assert latent_buffers(k) == {stages - 1}, (block_n, stages, latent_buffers(k))
    assert "cp.async" in k.asm["ptx"] and k.metadata.shared <= 227 * 1024
    est = pipelined_smem_bytes(block_n, stages, 16, 512, 64, 2)
    assert abs(k.metadata.shared - est) < 4096, (k.metadata.shared, est)  # the launcher's occupancy estimate
sig = {n: "*bf16" for n in ("ql_ptr", "qp_ptr", "cache_ptr", "out_ptr")}
sig.update(bt_ptr="*i64", seq_lens_ptr="*i64", qsl_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
           scale_log2="fp32")
split_const = dict(NUM_HEADS=16, BLOCK_H=16, RANK=512, BLOCK_R=512, ROPE=64, BLOCK_P=64, BLOCK_SIZE=16, BLOCK_N=32,
                   DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", PREFETCH=False, TRANSPOSED=False,
                   PIPELINED=True)
for warps in (8, 4):  # the split kernel's warps under one wave of SMs and from one wave on
    k = compile_sm90(_mla_decode_split_kernel, sig, split_const, warps, PIPELINED_TILE[2])
    assert latent_buffers(k) == {PIPELINED_TILE[2] - 1} and k.metadata.shared <= 227 * 1024
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_pipelined_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("num_programs", [None, 5, 132])
def test_pipelined_balanced_decode_gpu(num_programs):
    import random

    r = random.Random(0)
    lens = [r.randint(100, 2048) for _ in range(200)] + [0, 1, 17, 4000]
    for tile in (None, (16, 4, 4), (64, 8, 3)):
        _check_balanced(16, 512, 64, lens, num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16, tile=tile)
    _check_balanced(128, 512, 64, lens[:20], num_programs, torch.bfloat16, "cuda", 2e-2, block_size=16)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_pipelined_split_decode_gpu(num_splits):
    lens = [1, 17, 300, 1029, 4000]
    _check_triton(16, 512, 64, lens, torch.bfloat16, "cuda", num_splits, atol=2e-2, pipelined=True)
    _check_triton(128, 512, 64, lens[:3], torch.bfloat16, "cuda", num_splits, atol=2e-2, pipelined=True)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 64, 256])
def test_pipelined_decode_replays_in_a_cuda_graph_gpu(batch):
    """Captured once, replayed over new contexts: the plan (cost line, pieces) is rebuilt on the device from
    seq_lens each replay, no host sync; padding rows (seq_len 0) give zeros."""
    from meshserve.kernels.mla_decode_choice import use_balanced
    from meshserve.kernels.triton_mla import mla_decode
    from meshserve.kernels.triton_mla_balanced import mla_decode_balanced

    first = [max(1, (37 * i) % 900) for i in range(batch)]
    meta, cache, q_lat, q_pe = _inputs(16, 512, 64, [2048] * batch, torch.bfloat16, "cuda", 16)
    seq_lens = torch.tensor(first, device="cuda")
    if use_balanced(batch, None):
        run = lambda: mla_decode_balanced(q_lat, q_pe, cache, meta.block_tables, seq_lens,  # noqa: E731
                                          meta.query_start_loc, 0.3, pipelined=True)
    else:
        run = lambda: mla_decode(q_lat, q_pe, cache, meta.block_tables, seq_lens, meta.query_start_loc,  # noqa: E731
                                 0.3, 2048, pipelined=True)
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    for lens in (first, [(101 * i + 7) % 2049 for i in range(batch - 1)] + [0]):  # the second: a padding row
        seq_lens.copy_(torch.tensor(lens, device="cuda"))
        g.replay()
        meta.seq_lens, meta.seq_lens_cpu = seq_lens, lens
        expected = mla_decode_ref(q_lat, q_pe, cache, meta, 0.3)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@needs_triton
@interpreter_only
@pytest.mark.parametrize("kernel", ["pipelined", "auto"])
@pytest.mark.parametrize("balanced", [False, True])
def test_the_layer_runs_the_pipelined_loop_when_selected(monkeypatch, balanced, kernel):
    """MESHSERVE_MLA_DECODE_KERNEL=pipelined (KernelSelection.mla_decode_kernel) reaches the kernel the layer
    picks (split or balanced); auto (the default) only the balanced one; the output stays the torch path's."""
    from dataclasses import replace

    from meshserve.kernels import triton_mla, triton_mla_balanced
    from meshserve.layers.backend_selection import PLAIN
    from meshserve.layers.mla_attention import MLAAttention

    heads, nope, rope, v_dim, rank, block_size = 4, 8, 8, 8, 32, 4
    seq_lens = [70, 9, 0]
    layer = MLAAttention(heads, nope, rope, v_dim, rank, 0.25)
    layer.kernels = replace(PLAIN, attention_backend="triton", mla_balanced=balanced, mla_decode_kernel=kernel)
    meta, layer.kv_cache, _, q_pe = _inputs(heads, rank, rope, seq_lens, torch.float32, "cpu", block_size)
    g = torch.Generator().manual_seed(1)
    q_nope = torch.randn(len(seq_lens), heads, nope, generator=g)
    kv_b = torch.randn(heads * (nope + v_dim), rank, generator=g) * rank**-0.5
    launched = []
    for module, name in ((triton_mla, "mla_decode"), (triton_mla_balanced, "mla_decode_balanced")):
        fn = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, fn=fn, name=name, **k: launched.append((name, k["pipelined"]))
                            or fn(*a, **k))
    with torch.inference_mode():
        got = layer._absorbed(q_nope, q_pe, kv_b, meta, triton=True)
        ref = layer._absorbed(q_nope, q_pe, kv_b, meta, triton=False)
    assert launched == [("mla_decode_balanced" if balanced else "mla_decode", kernel == "pipelined" or balanced)]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_the_pipelined_loop_keeps_the_split_counts_the_warm_up_covers():
    """The pipelined loop changes no launch shape the engine keys graphs or warm-up by: the split kernel keeps
    its BLOCK_N, so every batch and context bound picks the same KV splits (the reduce variants the eager
    warm-up forces, tests/engine/test_decode_split_warmup.py), and the balanced kernel none."""
    pytest.importorskip("triton")
    from dataclasses import replace

    from meshserve.layers.backend_selection import PLAIN
    from meshserve.layers.mla_attention import MLAAttention

    def layer(kernel):
        m = MLAAttention(16, 16, 16, 16, 512, 0.25)
        m.kernels = replace(PLAIN, attention_backend="triton", mla_decode_kernel=kernel)
        return m

    cpu = torch.device("cpu")
    plain, pipelined = layer("default"), layer("pipelined")
    for rows in (1, 2, 7, 16, 33, 63, 64, 100, 256):
        for bound in (100, 800, 4096, 163840):
            assert (pipelined.decode_splits(rows, bound, torch.bfloat16, cpu)
                    == plain.decode_splits(rows, bound, torch.bfloat16, cpu))
