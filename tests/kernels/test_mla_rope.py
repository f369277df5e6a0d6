"""The fused MLA prologue (kernels/triton_mla_rope.py): its reference equals the model's unfused math (RMSNorm,
apply_deepseek_rotary, write_latent_ref), and the Triton kernel equals the reference, in the interpreter on tiny
shapes (5 heads: a masked head block; slot -1 padding) and on the GPU (`-m gpu`) at DeepSeek-V2-Lite's shapes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.mla_ref import mla_rope_latent_ref, write_latent_ref
from meshserve.layers.norm import RMSNorm
from meshserve.models.deepseek import apply_deepseek_rotary
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def _inputs(heads, nope, rope, rank, tokens, dtype, device, max_pos=64):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)
    q, kv_a = rnd(tokens, heads, nope + rope), rnd(tokens, rank + rope)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), 1.0 / 10000 ** (torch.arange(rope // 2) / (rope // 2)))
    emb = torch.cat([freqs, freqs], dim=-1).to(device)
    positions = torch.randint(0, max_pos, (tokens,), generator=g).to(device)
    weight = (1 + 0.1 * torch.randn(rank, generator=g)).to(device=device, dtype=dtype)
    slots = torch.randperm(2 * tokens, generator=g)[:tokens].to(device)
    slots[1] = -1  # CUDA-graph padding: no write
    cache = torch.zeros(1, 2 * tokens, 1, 1, rank + rope, dtype=dtype, device=device)
    return q, kv_a, positions, emb.cos(), emb.sin(), weight, slots, cache


@pytest.mark.parametrize("interleave", [True, False])
def test_reference_is_the_models_unfused_prologue(interleave):
    heads, nope, rope, rank = 3, 8, 8, 16
    q, kv_a, positions, cos, sin, weight, slots, cache = _inputs(heads, nope, rope, rank, 6, torch.float32, "cpu")
    got = mla_rope_latent_ref(q, kv_a, positions, cos, sin, weight, 1e-6, cache, slots, interleave)
    norm = RMSNorm(rank, 1e-6)
    norm.weight.data.copy_(weight)
    c, p = cos[positions], sin[positions]
    expected = apply_deepseek_rotary(q[..., nope:], c, p, interleave)
    k_pe = apply_deepseek_rotary(kv_a[:, None, rank:], c, p, interleave)[:, 0]
    ref_cache = torch.zeros_like(cache)
    write_latent_ref(norm(kv_a[:, :rank]), k_pe, ref_cache, slots)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(cache, ref_cache, atol=1e-6, rtol=1e-6)


def _check(heads, nope, rope, rank, tokens, dtype, device, interleave, atol):
    from meshserve.kernels.triton_mla_rope import mla_rope_latent

    q, kv_a, positions, cos, sin, weight, slots, cache = _inputs(heads, nope, rope, rank, tokens, dtype, device)
    ref_cache = cache.clone()
    q_before = q.clone()
    got = mla_rope_latent(q, kv_a, positions, cos, sin, weight, 1e-6, cache, slots, interleave)
    expected = mla_rope_latent_ref(q, kv_a, positions, cos, sin, weight, 1e-6, ref_cache, slots, interleave)
    assert got.is_contiguous() and torch.equal(q, q_before)  # q is read, not rotated in place
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)
    torch.testing.assert_close(cache.float(), ref_cache.float(), atol=atol, rtol=atol)
    assert not cache[0, :, 0, 0].abs().sum(-1).eq(0).all()


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the Triton interpreter on CPU (on a GPU: the -m gpu test)")
@pytest.mark.parametrize("interleave", [True, False])
def test_triton_prologue_in_interpreter(interleave):
    _check(5, 8, 8, 24, 7, torch.float32, "cpu", interleave, 1e-5)


@needs_triton
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("heads", [16, 128])
def test_triton_prologue_gpu(heads):
    """DeepSeek-V2-Lite (16 heads) and V3 (128) shapes: N 128, P 64, R 512; bf16 and fp32."""
    _check(heads, 128, 64, 512, 300, torch.bfloat16, "cuda", True, 2e-2)
    _check(heads, 128, 64, 512, 33, torch.float32, "cuda", False, 1e-5)


# the prologue and the decode kernel (its default tile and the sweep's widest) compile for sm_90, and the
# decode tiles fit an H100's shared memory
_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_mla import _mla_decode_split_kernel, _decode_config
from meshserve.kernels.triton_mla_rope import _mla_rope_latent_kernel


sig = {n: "*bf16" for n in ("q_ptr", "kva_ptr", "w_ptr", "cache_ptr", "qpe_ptr")}
sig.update(pos_ptr="*i64", slot_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", eps="fp32")
compile_sm90(_mla_rope_latent_kernel, sig, dict(NUM_HEADS=16, BLOCK_H=16, NOPE=128, RANK=512, BLOCK_R=512, HALF=32,
             BLOCK_HALF=32, INTERLEAVE=True), 4, 1)
block_n, warps = _decode_config(512, 2)
for block_n, warps, stages in [(block_n, warps, 2), (64, 8, 2)]:
    sig = {n: "*bf16" for n in ("ql_ptr", "qp_ptr", "cache_ptr", "out_ptr")}
    sig.update(bt_ptr="*i64", seq_lens_ptr="*i64", qsl_ptr="*i64", ws_acc_ptr="*fp32", ws_ml_ptr="*fp32",
               scale_log2="fp32")
    const = dict(NUM_HEADS=16, BLOCK_H=16, RANK=512, BLOCK_R=512, ROPE=64, BLOCK_P=64, BLOCK_SIZE=16,
                 BLOCK_N=block_n, DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", PREFETCH=False, TRANSPOSED=False)
    k = compile_sm90(_mla_decode_split_kernel, sig, const, warps, stages)
    assert k.metadata.shared <= 227 * 1024, (block_n, k.metadata.shared)
    print(block_n, warps, stages, "shared", k.metadata.shared, "cp.async" in k.asm["ptx"])
print("compiled")
"""


@needs_triton
@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_kernels_compile_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)
