"""triton_decode_layer.decode_layer (a decoder layer in one launch at batch 1) against decode_layer_ref (the plain
path's ops composed): the next residual stream and the cache after the step.

Without CUDA the kernel runs in the Triton interpreter, one launch a phase (a grid barrier cannot open there:
programs run one after another), in fp32 and fp16 on tiny shapes; a subprocess compiles the one-launch kernel,
barriers included, for sm_90 (tests/kernels/sm90.py). With `-m gpu`: Qwen3-0.6B's layer in bf16, one launch
against the per-phase launches and the reference, and replayed in a CUDA graph.
"""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch

from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if importlib.util.find_spec("triton") is not None:
    from meshserve.kernels.decode_layer_ref import decode_layer_ref
    from meshserve.kernels.decode_layer_weights import DecodeLayerWeights
    from meshserve.kernels.triton_decode_layer import BARRIERS_PER_LAYER, decode_layer
    from meshserve.kernels.triton_decode_layer_gemv import phase_tiles
    from meshserve.kernels.quant_ref import pack_int4_rows, quantize_fp8_per_channel, quantize_int4_groups
    from tests.kernels.test_triton_decode_fused import fused_case


def layer_case(seq_len: int, hidden: int, heads: int, kv_heads: int, head_dim: int, inter: int, dtype,
               qk_norm: bool = True, bias: bool = False, seed: int = 0, device: str = "cpu", fp8: bool = False):
    """(h, weights, positions, cos, sin, cache, meta, scale, k_scale, v_scale): one decode step of one sequence
    whose token sits at position seq_len - 1, over a cache of random earlier keys and values (fp8: an e4m3
    cache with the scales of tests/kernels/test_triton_decode_fused.py)."""
    _, positions, cos, sin, qw, kw, cache, meta, *_, k_scale, v_scale = fused_case(
        ([seq_len], heads, kv_heads, head_dim, 16, None), dtype, fp8, qk_norm, seed, device=device)
    g = torch.Generator().manual_seed(seed + 2)

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g)).to(dtype).to(device)

    qkv_n = (heads + 2 * kv_heads) * head_dim
    w = DecodeLayerWeights(
        1 + rnd(hidden, scale=0.2), rnd(qkv_n, hidden, scale=hidden**-0.5), rnd(hidden, heads * head_dim,
                                                                                scale=(heads * head_dim) ** -0.5),
        1 + rnd(hidden, scale=0.2), rnd(2 * inter, hidden, scale=hidden**-0.5), rnd(hidden, inter, scale=inter**-0.5),
        1e-6, q_norm=qw, k_norm=kw, bqkv=rnd(qkv_n, scale=0.1) if bias else None,
        bo=rnd(hidden, scale=0.1) if bias else None, bgu=rnd(2 * inter, scale=0.1) if bias else None,
        bd=rnd(hidden, scale=0.1) if bias else None,
    )
    h = rnd(1, hidden, scale=2.0)
    return h, w, positions, cos, sin, cache, meta, head_dim**-0.5, k_scale, v_scale


def run_both(case: tuple, dtype, device="cpu", fp8=False, **launch):
    """(reference out, reference cache, kernel out, kernel cache, cache before, meta)."""
    seq_len, hidden, heads, kv_heads, head_dim, inter, qk_norm, bias = case
    h, w, pos, cos, sin, cache, meta, scale, ks, vs = layer_case(seq_len, hidden, heads, kv_heads, head_dim, inter,
                                                                 dtype, qk_norm, bias, seq_len, device, fp8)
    ref_cache, got_cache = cache.clone(), cache.clone()
    expect = decode_layer_ref(h, w, pos, cos, sin, ref_cache, meta, scale, heads, kv_heads, ks, vs)
    barriers = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32, device=device)
    out = decode_layer(h, w, pos, cos, sin, got_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale,
                       heads, kv_heads, barriers, ks, vs, **launch)
    return expect, ref_cache, out, got_cache, cache, meta


CASES = [
    # seq_len, hidden, heads, kv heads, head_dim, intermediate, q/k norm, biases
    (1, 64, 4, 2, 16, 96, True, False),  # the first token: attention over itself alone
    (37, 64, 4, 2, 16, 96, True, True),  # Qwen2-style biases, a context inside one 128-token tile
    (300, 48, 6, 2, 16, 80, False, False),  # GQA 3, no q/k norm (Llama), three tiles; odd row counts
    (130, 72, 6, 2, 24, 80, True, False),  # head_dim 24 (halves of 12 in 32-wide rows), a hidden size of 72
]


@interp
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("attn_splits", [1, 3])  # 3: the KV split holding the token writes it, the last merges
def test_layer_matches_reference_interp(case, dtype, attn_splits):
    expect, ref_cache, out, got_cache, before, meta = run_both(case, dtype, num_programs=3, attn_splits=attn_splits)
    atol, rtol = (2e-5, 2e-5) if dtype == torch.float32 else (2e-2, 2e-2)
    torch.testing.assert_close(out, expect, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_cache, ref_cache, atol=atol, rtol=rtol)
    slot = int(meta.slot_mapping[0])
    blk, off = divmod(slot, got_cache.shape[2])
    assert not torch.equal(got_cache[:, blk, off], before[:, blk, off])  # the token's K / V went in
    untouched = torch.ones(got_cache.shape[1:3], dtype=torch.bool)
    untouched[blk, off] = False
    assert torch.equal(got_cache[:, untouched], before[:, untouched])  # and nothing else


def _interpreter_e4m3_carry(got: torch.Tensor, expect: torch.Tensor) -> torch.Tensor:
    """Where the Triton interpreter's fp32 -> e4m3 conversion dropped a rounding carry into the next binade
    (Triton 3.9: 31.0 -> 16 and 1.97 -> 1, where torch and the GPU's cvt give 32 and 2): got is half of expect,
    a power of two."""
    e, g = expect.float(), got.float()
    return (g * 2 == e) & (torch.frexp(e.abs())[0] == 0.5)


@interp
@pytest.mark.parametrize("case", CASES[1:])
def test_layer_over_an_fp8_cache_interp(case):
    """An fp32 model over an e4m3 cache (V transposed in its blocks, the default layout): the token's K / V
    written scaled and saturated as write_kv does (byte for byte but for the interpreter's dropped carries), the
    tiles read through the decode kernel's fp8 path."""
    expect, ref_cache, out, got_cache, before, meta = run_both(case, torch.float32, fp8=True, num_programs=3,
                                                               attn_splits=2)
    differ = got_cache.view(torch.uint8) != ref_cache.view(torch.uint8)
    assert bool((~differ | _interpreter_e4m3_carry(got_cache, ref_cache)).all())
    atol = 2e-5 if not differ.any() else 5e-2  # a K element off by a binade moves the scores
    torch.testing.assert_close(out, expect, atol=atol, rtol=atol)


def fp8_weights(w):
    """w with its four projections quantized to e4m3 per output row (layers/quantization/fp8.py's online
    quantizer), their scales beside them."""
    quantized = [quantize_fp8_per_channel(t) for t in (w.wqkv, w.wo, w.wgu, w.wd)]
    (wqkv, sqkv), (wo, so), (wgu, sgu), (wd, sd) = quantized
    return DecodeLayerWeights(w.ln1, wqkv, wo, w.ln2, wgu, wd, w.eps, bqkv=w.bqkv, q_norm=w.q_norm, k_norm=w.k_norm,
                              bo=w.bo, bgu=w.bgu, bd=w.bd, qk_eps=w.qk_eps, scales=(sqkv, so, sgu, sd))


def int4_weights(w, group_size: int):
    """w with its four projections quantized to INT4 round-to-nearest in groups of group_size (the dummy-weight
    quantizer of layers/quantization/int4.py), in the internal layout: qweight [K / 8, N], scales / zeros [G, N]."""
    packed = []
    for t in (w.wqkv, w.wo, w.wgu, w.wd):
        q, scales, zeros = quantize_int4_groups(t, group_size)
        packed.append((pack_int4_rows(q), scales, zeros))
    (qkv, o, gu, d) = packed
    return DecodeLayerWeights(w.ln1, qkv[0], o[0], w.ln2, gu[0], d[0], w.eps, bqkv=w.bqkv, q_norm=w.q_norm,
                              k_norm=w.k_norm, bo=w.bo, bgu=w.bgu, bd=w.bd, qk_eps=w.qk_eps,
                              scales=[p[1] for p in packed], zeros=[p[2] for p in packed], group_size=group_size)


def check_quantized_layer(case: tuple, dtype, quantize, **launch):
    """The kernel over the case's layer with its projections quantize(w)'d against decode_layer_ref over the same
    quantized weights (their dequantized products), and, in fp16, closer to it than the layer's 16-bit weights
    are: the quantized weights are what it read."""
    seq_len, hidden, heads, kv_heads, head_dim, inter, qk_norm, bias = case
    h, w16, pos, cos, sin, cache, meta, scale, *_ = layer_case(seq_len, hidden, heads, kv_heads, head_dim, inter,
                                                               dtype, qk_norm, bias, seq_len)
    w = quantize(w16)
    ref_cache, got_cache = cache.clone(), cache.clone()
    expect = decode_layer_ref(h, w, pos, cos, sin, ref_cache, meta, scale, heads, kv_heads)
    bars = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32)
    out = decode_layer(h, w, pos, cos, sin, got_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale,
                       heads, kv_heads, bars, attn_splits=2, **launch)
    tol = 2e-2 if dtype == torch.float16 else 5e-2
    torch.testing.assert_close(out, expect, atol=tol, rtol=tol)
    torch.testing.assert_close(got_cache, ref_cache, atol=tol, rtol=tol)
    if dtype == torch.float16:  # (bf16's roundings of the intermediates, ~1% apart, hide the weights' error)
        plain = decode_layer_ref(h, w16, pos, cos, sin, cache.clone(), meta, scale, heads, kv_heads)
        assert (plain.float() - expect.float()).abs().mean() > 2 * (out.float() - expect.float()).abs().mean()
    return w


@interp
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_programs", [1, 3])
def test_layer_with_fp8_weights_matches_reference_interp(case, dtype, num_programs):
    """fp8 projections (e4m3 words, a scale a row): each word's four products in fp16 against its x scaled to
    32 at most, as the words GEMV takes them, against the dequantized weights' fp32 products."""
    w = check_quantized_layer(case, dtype, fp8_weights, num_programs=num_programs)
    assert w.fp8 and w.wqkv.dtype == torch.float8_e4m3fn


@interp
@pytest.mark.parametrize("case", [*CASES, (37, 256, 4, 2, 64, 512, True, False)])  # the last: 16-32 groups a row
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_programs", "stream_values", "num_warps"), [(1, 32, 8), (3, 8, 1)])
def test_layer_with_int4_weights_matches_reference_interp(case, dtype, num_programs, stream_values, num_warps):
    """INT4 projections (nibbles in [K / 8, N] words, a scale and zero a group): each word's eight products in
    fp16 lanes against its group's x scaled to 32 at most, column blocks over the whole K, against the dequantized
    weights' products, x staged once a phase and two words of a group a thread. (3, 8, 1): one warp streaming 8
    values a thread, so the last case's blocks take 8-16 trips of 1-2 groups."""
    hidden, inter = case[1], case[5]
    if hidden % 16:  # (130, 72, ...): groups of 8 only, which the kernel does not take (int4_group_fits)
        with pytest.raises(ValueError, match="16 times a power of two, got 8"):
            int4_weights(layer_case(*case[:6], dtype)[1], 8)
        return
    w = check_quantized_layer(case, dtype, lambda w16: int4_weights(w16, 16), num_programs=num_programs,
                              stream_values=stream_values, num_warps=num_warps)
    assert w.int4 and w.out_in(w.wd) == (hidden, inter)


def test_phase_tiles_take_each_phase_by_its_output_features():
    """Llama-3.1-8B on an H200 (132 programs of 256 threads): INT4's qkv tile by its 6,144 output columns (16 a
    block, three blocks a program; it was once picked from its 512 word rows, 8 columns), o / down 32; the 16-bit
    phases 16 rows; gate_up even in every format (a block's gate rows and their up rows); a MoE layer's gate_up
    rows an expert's and nothing preloaded past the routing."""
    llama = (6144, 4096, 4096, 14336, 1, 1, False)
    int4 = phase_tiles(*llama, "int4", 128, 132, 256)
    assert (int4["R_QKV"], int4["R_O"], int4["R_GU"], int4["R_D"]) == (16, 32, 32, 32)
    bf16 = phase_tiles(*llama, "16-bit", None, 132, 256)
    assert (bf16["R_QKV"], bf16["K_QKV"], bf16["R_GU"]) == (16, 512, 16)
    assert phase_tiles(6144, 4096, 4096, 14336, 1, 1, False, "fp8", None, 132, 256)["K_QKV"] == 256  # words
    moe = phase_tiles(5120, 4096, 2048, 768, 8, 128, True, "16-bit", None, 132, 256)
    assert (2 * 768) % moe["R_GU"] == 0 and moe["R_GU"] >= 2 and moe["P_GU"] == moe["P_D"] == 0
    assert phase_tiles(8, 8, 8, 8, 1, 1, False, "16-bit", None, 132, 256)["R_GU"] >= 2


@interp
def test_layer_rejects_mixed_unscaled_or_misshapen_quantized_weights_interp():
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(37, 64, 4, 2, 16, 96, torch.float16)
    q, i4 = fp8_weights(w), int4_weights(w, 16)
    with pytest.raises(ValueError, match="four projections in one format"):
        DecodeLayerWeights(w.ln1, q.wqkv, w.wo, w.ln2, w.wgu, w.wd, w.eps, scales=q.scales)
    with pytest.raises(ValueError, match="four projections in one format"):
        DecodeLayerWeights(w.ln1, q.wqkv, q.wo, w.ln2, q.wgu, q.wd, w.eps)
    with pytest.raises(ValueError, match="four projections in one format"):  # fp8 and INT4 in one layer
        DecodeLayerWeights(w.ln1, q.wqkv, q.wo, w.ln2, i4.wgu, i4.wd, w.eps, scales=q.scales)
    with pytest.raises(ValueError, match="scales and zeros belong"):
        DecodeLayerWeights(w.ln1, w.wqkv, w.wo, w.ln2, w.wgu, w.wd, w.eps, scales=q.scales)
    for group in (8, 12, 24, 48):  # a word row a group; words straddling groups; 3 and 6 word rows a group
        with pytest.raises(ValueError, match=f"16 times a power of two, got {group}"):
            DecodeLayerWeights(w.ln1, i4.wqkv, i4.wo, w.ln2, i4.wgu, i4.wd, w.eps, scales=i4.scales, zeros=i4.zeros,
                               group_size=group)
    bars = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32)
    args = (pos, cos, sin, cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale, 4, 2, bars)
    with pytest.raises(ValueError, match="16-bit row"):
        decode_layer(h.float(), q, *args)
    bad = copy.copy(q)
    bad.scales = (q.scales[0].half(), *q.scales[1:])
    with pytest.raises(ValueError, match="fp32 row scales"):
        decode_layer(h, bad, *args)
    with pytest.raises(ValueError, match="timing takes one launch on a GPU"):  # (clocks are inline PTX)
        decode_layer(h, i4, *args, timing=torch.zeros(4, 16, dtype=torch.int64))
    shifted = torch.empty(1, 65, dtype=h.dtype)[:, 1:]  # 2 bytes past an 8-byte boundary
    shifted.copy_(h)
    with pytest.raises(ValueError, match="8-byte aligned"):
        decode_layer(shifted, i4, *args)
    bad = copy.copy(i4)
    bad.zeros = (i4.zeros[0][:-1], *i4.zeros[1:])  # a group short
    with pytest.raises(ValueError, match="INT4 qkv weight .* needs zeros"):
        decode_layer(h, bad, *args)


def moe_weights(w, experts: int, top_k: int, renormalize: bool, seed: int = 0):
    """w (a dense layer's) with MoE experts in place of its MLP: a router and E experts of w's widths, and a
    load counter."""
    g = torch.Generator().manual_seed(seed + 3)
    inter, hidden = w.wd.shape[-1], w.wd.shape[0]
    dt, dev = w.wd.dtype, w.wd.device

    def rnd(*shape, scale):
        return (scale * torch.randn(*shape, generator=g)).to(dt).to(dev)

    return DecodeLayerWeights(
        w.ln1, w.wqkv, w.wo, w.ln2, rnd(experts, 2 * inter, hidden, scale=hidden**-0.5),
        rnd(experts, hidden, inter, scale=inter**-0.5), w.eps, bqkv=w.bqkv, q_norm=w.q_norm, k_norm=w.k_norm, bo=w.bo,
        qk_eps=w.qk_eps, wr=rnd(experts, hidden, scale=2.0 * hidden**-0.5), routing=(top_k, renormalize, 1.0),
        expert_load=torch.zeros(experts, dtype=torch.int64, device=dev),
    )


@interp
@pytest.mark.parametrize(("experts", "top_k", "renormalize"), [(8, 2, True), (16, 4, False)])  # Mixtral; Qwen-ish
@pytest.mark.parametrize("attn_splits", [1, 2])
def test_moe_layer_matches_reference_interp(experts, top_k, renormalize, attn_splits):
    """A MoE layer: the router's phase, every program routing the token itself (softmax top-k, kernels'
    _route_row), the chosen experts' gate/up rows, their down rows summed with the routing weights in fp32."""
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(37, 64, 4, 2, 16, 48, torch.float32)
    w = moe_weights(w, experts, top_k, renormalize)
    ref_w = copy.copy(w)
    ref_w.expert_load = torch.zeros_like(w.expert_load)  # the same tensors, a counter of its own
    ref_cache, got_cache = cache.clone(), cache.clone()
    expect = decode_layer_ref(h, ref_w, pos, cos, sin, ref_cache, meta, scale, 4, 2)
    bars = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32)
    out = decode_layer(h, w, pos, cos, sin, got_cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale,
                       4, 2, bars, num_programs=3, attn_splits=attn_splits)
    torch.testing.assert_close(out, expect, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_cache, ref_cache, atol=2e-5, rtol=2e-5)
    assert torch.equal(w.expert_load, ref_w.expert_load) and int(w.expert_load.sum()) == top_k


@interp
def test_layer_grid_of_one_program_and_of_more_programs_than_rows_interp():
    case = CASES[1]
    a = run_both(case, torch.float32, num_programs=1)[2]
    b = run_both(case, torch.float32, num_programs=200)[2]  # most programs own no row and no KV head
    torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


@interp
def test_layer_rejects_what_it_cannot_run_interp():
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(5, 64, 4, 2, 16, 96, torch.float32)
    bars = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32)
    args = (pos, cos, sin, cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale)
    with pytest.raises(ValueError, match="one row"):
        decode_layer(h.expand(2, -1), w, *args, 4, 2, bars)
    with pytest.raises(ValueError, match="heads"):
        decode_layer(h, w, *args, 2, 2, bars)
    with pytest.raises(ValueError, match="barrier"):
        decode_layer(h, w, *args, 4, 2, bars[:2])
    with pytest.raises(ValueError, match="one wave"):
        decode_layer(h, w, *args, 4, 2, bars, one_launch=True, num_programs=10_000)


_COMPILE_SM90 = COMPILE_SM90_PRELUDE + f"import sys\nsys.path.insert(0, {str(Path(__file__).parents[2])!r})\n" + """
import os
from tools.sass_loops import backward_loops, cubin_facts, opcodes
from meshserve.kernels.triton_decode_layer import _decode_layer_kernel
from meshserve.kernels.triton_decode_layer_gemv import phase_tiles
from tools.decode_layer_sass import signature
tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def check(consts, barriers):
    int4 = consts.get("W_INT4", False)
    fmt = "int4" if int4 else "fp8" if consts["W_FP8"] else "bf16"
    heads, kv_heads, head_dim = consts["NUM_HEADS"], consts["NUM_KV_HEADS"], consts["HEAD_DIM"]
    consts.update(phase_tiles((heads + 2 * kv_heads) * head_dim, heads * head_dim, consts["HIDDEN"], consts["INTER"],
                              consts["TOP_K"], consts["NUM_EXPERTS"], consts["MOE"], fmt, consts["INT4_GROUP"], 132,
                              256))  # an H200
    k = compile_sm90(_decode_layer_kernel, signature(fmt), consts, 8, 1)
    ptx = k.asm["ptx"]
    # a barrier: a release add (its result unused: red under Triton 3.9, atom under the device image's 3.6) and a
    # spin on an acquire load (Triton lowers the add of 0 to one); attention's tensor-core tile (its KV splits
    # merged inline: the tickets' acq_rel atomics besides); PDL's wait and trigger
    releases = ptx.count("red.global.gpu.release.add") + ptx.count("atom.global.gpu.release.add")
    assert releases == barriers and ptx.count("ld.global.gpu.acquire") == barriers, (releases, barriers)
    assert "mma" in ptx and "griddepcontrol.wait" in ptx and "griddepcontrol.launch_dependents" in ptx
    assert k.metadata.shared <= 228 * 1024 // 4  # 22 KB at this writing
    # one program of 8 warps an SM: no register spills (the attention phase at 128-token tiles spilled 280 B); the
    # INT4 layer at 255 registers keeps some stack outside its loops (32 B under Triton 3.9, 80 under the device
    # image's 3.6), none in any loop (tools/sass_loops.py)
    if os.path.exists(tool):
        regs, stack, sass = cubin_facts(k)
        assert stack <= (96 if int4 else 0), (regs, stack)
        for body in backward_loops(sass):
            assert not any(op.startswith(("LDL", "STL")) for op in opcodes(body)), "a spill inside a loop"


base = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=64, ATTN_SPLITS=8, HAS_QKV_BIAS=False,
            HAS_O_BIAS=False, HAS_GU_BIAS=False, HAS_D_BIAS=False, HAS_NORM=True, UPCAST_DOT=False,
            DOT_PRECISION="tf32", KV_FP8=False, FP8_TILE="convert", V_T=False, PHASE_LO=0, PHASE_HI=5,
            USE_GDC=2, W_FP8=False, W_INT4=False, INT4_GROUP=1, ASM=False, TIMING=False)
# Qwen3-0.6B's layer, every phase in one launch under PDL's late trigger: four barriers
dense = dict(base, HIDDEN=1024, INTER=3072, NUM_HEADS=16, NUM_KV_HEADS=8, GROUP=2, ROWS=16, BLOCK_H=1024, MOE=False,
             NUM_EXPERTS=1, TOP_K=1, RENORMALIZE=False, BLOCK_E=1, BLOCK_TOPK=1, COUNT_LOAD=False)
check(dense, 4)
# Qwen3-30B-A3B's: the router's phase and its barrier besides, 8 of 128 experts, the load counted
moe = dict(base, HIDDEN=2048, INTER=768, NUM_HEADS=32, NUM_KV_HEADS=4, GROUP=8, ROWS=16, BLOCK_H=2048, MOE=True,
           NUM_EXPERTS=128, TOP_K=8, RENORMALIZE=True, BLOCK_E=128, BLOCK_TOPK=8, COUNT_LOAD=True)
check(moe, 5)
# Llama-3.1-8B's layer with fp8 weights (the words' inline PTX) over an fp8 cache
llama = dict(base, HIDDEN=4096, INTER=14336, NUM_HEADS=32, NUM_KV_HEADS=8, GROUP=4, ROWS=16, BLOCK_H=4096, MOE=False,
             NUM_EXPERTS=1, TOP_K=1, RENORMALIZE=False, BLOCK_E=1, BLOCK_TOPK=1, COUNT_LOAD=False, W_FP8=True,
             ASM=True, KV_FP8=True, HAS_NORM=False)
check(llama, 4)
# and with AWQ-style INT4 weights (groups of 128: the words' inline PTX)
check(dict(llama, W_FP8=False, W_INT4=True, INT4_GROUP=128), 4)
# its GEMV trips read x staged once a phase and the scales and zeros in the words' own layout: no barrier and no
# shared memory in a trip (they took 6-14 barriers a trip before; tools/decode_layer_sass.py)
if os.path.exists(tool):
    from tools.decode_layer_sass import compile_phase, layer_consts, trip_loops
    int4 = layer_consts("llama-3.1-8b", "int4")
    for phase in (4, 5):  # gate_up's 7 blocks a program of 4 trips, down's 14 trips (qkv's 2 are unrolled)
        trips = trip_loops(cubin_facts(compile_phase(int4, "int4", phase))[2])
        assert trips and not any(op.startswith(("BAR", "LDS", "STS")) for t in trips for op in t), trips
# the dense layer with its clocks recorded (tools/decode_layer_phases.py): %clock64 at start, after the wait, at
# each barrier's arrival and departure and at the end, %globaltimer at start and end
timed = compile_sm90(_decode_layer_kernel, signature("bf16"), dict(dense, TIMING=True), 8, 1).asm["ptx"]
assert timed.count("%clock64") == 2 + 2 * 4 + 1 and timed.count("%globaltimer") == 2
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_layer_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU (-m gpu): Qwen3-0.6B's layer in bf16
# ----------------------------------------------------------------------------------------------------------
QWEN = (None, 1024, 16, 8, 128, 3072, True, False)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("seq_len", [1, 200, 2000])
@pytest.mark.parametrize(("programs_per_sm", "num_warps", "fp8"), [(1, 8, False), (2, 8, False), (1, 16, False),
                                                                   (1, 8, True)])
def test_layer_one_launch_matches_phases_and_reference_gpu(seq_len, programs_per_sm, num_warps, fp8):
    case = (seq_len, *QWEN[1:])
    launch = dict(programs_per_sm=programs_per_sm, num_warps=num_warps)
    expect, ref_cache, out, got_cache, _, _ = run_both(case, torch.bfloat16, "cuda", fp8, one_launch=True, **launch)
    phases = run_both(case, torch.bfloat16, "cuda", fp8, one_launch=False, **launch)
    torch.testing.assert_close(out, phases[2], atol=0, rtol=0)  # the same programs' sums: the same bits
    assert torch.equal(got_cache.view(torch.uint8), phases[3].view(torch.uint8))
    torch.testing.assert_close(out.float(), expect.float(), atol=5e-2, rtol=2e-2)
    # the token's K / V: within a step of the cache's format of the reference's (the projections' sums differ)
    step = 0.13 if fp8 else 2e-2
    torch.testing.assert_close(got_cache.float(), ref_cache.float(), atol=step, rtol=step)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [(300, *QWEN[1:]), (300, 4096, 32, 8, 128, 14336, False, False)])  # Qwen; 8B
@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_layer_with_quantized_weights_one_launch_matches_phases_and_reference_gpu(case, fmt):
    """fp8 / INT4 (groups of 128) projections through their inline PTX: one launch gives the per-phase launches'
    bits and stays within bf16's roundings of the dequantized reference."""
    seq_len, hidden, heads, kv_heads, head_dim, inter, qk_norm, bias = case
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(seq_len, hidden, heads, kv_heads, head_dim, inter,
                                                             torch.bfloat16, qk_norm, bias, 5, "cuda")
    w = fp8_weights(w) if fmt == "fp8" else int4_weights(w, 128)
    ref_cache = cache.clone()
    expect = decode_layer_ref(h, w, pos, cos, sin, ref_cache, meta, scale, heads, kv_heads)
    outs, caches = [], []
    for one_launch in (True, False):
        c = cache.clone()
        bars = torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32, device="cuda")
        outs.append(decode_layer(h, w, pos, cos, sin, c, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale,
                                 heads, kv_heads, bars, one_launch=one_launch))
        caches.append(c)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    assert torch.equal(caches[0], caches[1])
    torch.testing.assert_close(outs[0].float(), expect.float(), atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(caches[0].float(), ref_cache.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
def test_layer_clocks_are_ordered_and_leave_the_output_alone_gpu():
    """timing=: every program's clocks run forward through its phases and barriers (dense: barrier 3 unused), and
    the timed launch's output is the untimed one's, bit for bit."""
    from meshserve.kernels.triton_decode_layer import TIMING_SLOTS

    case = (300, *QWEN[1:])
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(*case[:6], torch.bfloat16, device="cuda")
    args = (pos, cos, sin, cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale, 16, 8)
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    clocks = torch.zeros(programs, TIMING_SLOTS, dtype=torch.int64, device="cuda")
    plain = decode_layer(h, w, *args, torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32, device="cuda"))
    timed = decode_layer(h, w, *args, torch.zeros(BARRIERS_PER_LAYER, dtype=torch.int32, device="cuda"),
                         timing=clocks)
    torch.testing.assert_close(timed, plain, atol=0, rtol=0)
    order = [0, 1, 2, 3, 4, 5, 6, 7, 10, 11, 12]  # start, wait, barriers 0, 1, 2 and 4 (arrive, leave), end
    recs = clocks.cpu()
    assert bool((recs[:, order].diff(dim=1) >= 0).all()) and bool((recs[:, 14] > recs[:, 13]).all())


@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
def test_layer_replays_in_a_cuda_graph_gpu():
    """Four layers a step, each with its own counters zeroed once a step inside the graph: replays give the
    eager launch's bits for new inputs."""
    case = (300, *QWEN[1:])
    h, w, pos, cos, sin, cache, meta, scale, *_ = layer_case(*case[:6], torch.bfloat16, device="cuda")
    args = (pos, cos, sin, cache, meta.slot_mapping, meta.block_tables, meta.seq_lens, scale, 16, 8)

    def step(x):
        bars = torch.zeros(4, BARRIERS_PER_LAYER, dtype=torch.int32, device="cuda")
        for i in range(4):
            x = decode_layer(x, w, *args, bars[i])
        return x

    static_h = h.clone()
    step(static_h)  # compiles and checks the one wave outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step(static_h)
    for seed in range(3):
        static_h.copy_(torch.randn(h.shape, generator=torch.Generator().manual_seed(seed)).to(h))
        graph.replay()
        torch.testing.assert_close(static_out, step(static_h.clone()), atol=0, rtol=0)
