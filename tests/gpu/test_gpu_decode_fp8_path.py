"""MESHSERVE_DECODE_FP8_PATH=words on the GPU (kernels/triton_e4m3_words.py): the compiled words tile (inline
cvt.rn.f16x2.e4m3x2) gives every e4m3 byte's .to(fp16) bits, NaNs included, and the decode kernel with it
equals today's fp8 path ("convert") over production-like shapes (group 2 and 4, head_dim 64 and 128, one and
several splits, the inline reduce, a window, a padding row) and stays within the reference's tolerance; the
fused prologue's launch with it equals its two-step path and today's fp8 path.
The interpreter tests: tests/kernels/test_decode_fp8_words.py.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

if torch.cuda.is_available():
    import triton
    import triton.language as tl

    from meshserve.kernels.triton_e4m3_words import load_e4m3_tile

    @triton.jit
    def _gpu_words_kernel(src_ptr, out_ptr, ROWS: tl.constexpr, D: tl.constexpr):
        n = tl.arange(0, ROWS)
        tile = load_e4m3_tile(src_ptr, n.to(tl.int64) * D, n != 1, D, True)
        tl.store(out_ptr + n[:, None] * D + tl.arange(0, D)[None, :], tile)


def test_words_conversion_is_bit_exact_for_every_byte_gpu():
    src = torch.arange(256, dtype=torch.uint8, device="cuda").view(8, 32).view(torch.float8_e4m3fn)
    out = torch.full((8, 32), 7.0, dtype=torch.float16, device="cuda")
    _gpu_words_kernel[(1,)](src, out, ROWS=8, D=32)
    expect = src.to(torch.float16)
    expect[1] = 0  # the masked row
    nan = expect.isnan()
    assert nan.sum() == 2 and torch.equal(out.isnan(), nan)  # 0x7f and 0xff
    assert torch.equal(out.view(torch.int16)[~nan], expect.view(torch.int16)[~nan])


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])  # Qwen3-0.6B (group 2), Llama-3.1-8B (group 4)
@pytest.mark.parametrize("window", [None, 700])
def test_decode_words_equals_convert_gpu(head_dim, heads, window):
    from meshserve.kernels.attention_ref import paged_attention_ref
    from meshserve.kernels.triton_attention import TritonAttentionBackend, _fp8_tile
    from tests.kernels.test_triton_attention import make_case

    h, hkv = heads
    g = torch.Generator().manual_seed(head_dim + h)
    seq_lens = torch.randint(1, 3000, (24,), generator=g).tolist()
    seq_lens[:4] = [1, 127, 128, 2048]  # one token, tile edges, a long one
    q_lens = [1] * 24
    q_lens[5] = 0  # a CUDA-graph padding row: no output
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, head_dim, 16, torch.bfloat16, device="cuda", seed=3)
    cache8 = (cache.float() * 2.0).to(torch.float8_e4m3fn)
    assert _fp8_tile("words", query, cache8) == "words"
    args = (query, cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    ref = paged_attention_ref(query.float(), cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    for splits, inline in ((1, False), (4, False), (4, True), (None, False)):  # direct, reduce, inline, the rule
        convert = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline).attend(*args)
        words = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline,
                                       fp8_path="words").attend(*args)
        same = (words == convert).float().mean().item()
        diff = (words.float() - convert.float()).abs().max().item()
        print(f"head_dim {head_dim} heads {heads} window {window} splits {splits} inline {inline}: "
              f"{same:.4%} of outputs bit-equal to convert, max |diff| {diff:.3g}")
        torch.testing.assert_close(words.float(), convert.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(words.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_decode_words_equals_convert_gpu(heads, splits):
    """The fused prologue's launch (MESHSERVE_DECODE_FUSED_PROLOGUE) with the words path: its output equals the
    two-step path's with the same switch and the fused launch's with today's fp8 path, its cache the same bytes."""
    from tests.kernels.test_triton_decode_fused import run_both

    spec = ([1, 0, 300, 1000, 37, 5000], *heads, 128, 16, None)
    expect, two_step, out, fused, _, _ = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda",
                                                  fp8_path="words")
    convert = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda")[2]
    torch.testing.assert_close(out.float(), expect.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), convert.float(), atol=1e-2, rtol=1e-2)
    assert torch.equal(fused.view(torch.uint8), two_step.view(torch.uint8))  # rope alone: K bytes equal too
    assert (out[1] == 0).all()  # the padding row


@pytest.mark.parametrize("batch", [8, 64])  # the one tile (words under auto) and the grid tile (convert)
def test_decode_auto_path_takes_each_tile_its_path_gpu(batch, monkeypatch):
    """MESHSERVE_DECODE_FP8_PATH=auto on the device: a batch below two programs per SM runs the one tile with
    words, batch 64 x 8 KV heads the grid tile with convert; each equals the fixed path it chose, bit for bit."""
    import meshserve.kernels.triton_attention as ta
    from tests.kernels.test_triton_attention import make_case

    query, cache, meta = make_case([1] * batch, [1500] * batch, 16, 8, 128, 16, torch.bfloat16, device="cuda",
                                   seed=batch)
    cache8 = (cache.float() * 2.0).to(torch.float8_e4m3fn)
    args = (query, cache8, meta, 128**-0.5, None, 0.5, 0.25)
    seen = []
    launch = ta.decode_attention
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: (seen.append(kw["fp8_path"]), launch(*a, **kw))[1])
    auto = ta.TritonAttentionBackend(fp8_path="auto").attend(*args)
    grid = batch * 8 >= ta.GRID_TILE_MIN_WAVES * ta._num_sms(0)
    assert seen == ["convert" if grid else "words"]
    fixed = ta.TritonAttentionBackend(fp8_path=seen[0]).attend(*args)
    assert torch.equal(auto, fixed)


# ----------------------------------------------------------------------------------------------------------
# MESHSERVE_DECODE_FP8_PATH=fp8dot (kernels/triton_e4m3_dot.py): q and P rounded to e4m3, e4m3 wgmmas on the tiles
# ----------------------------------------------------------------------------------------------------------
FP8DOT_TOL = 5e-2  # against the fp32 reference and today's path: q and P's e4m3 rounding (test_decode_fp8dot.py)


def _fp8dot_case(heads, head_dim, seed, batch=24):
    from tests.kernels.test_triton_attention import make_case

    h, hkv = heads
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, 3000, (batch,), generator=g).tolist()
    seq_lens[:4] = [1, 127, 128, 2048]  # one token, tile edges, a long one
    q_lens = [1] * batch
    q_lens[5] = 0  # a CUDA-graph padding row: no output
    query, cache, meta = make_case(q_lens, seq_lens, h, hkv, head_dim, 16, torch.bfloat16, device="cuda", seed=seed)
    return query, (cache.float() * 2.0).to(torch.float8_e4m3fn), meta


def _report(name, got, want):
    same = (got == want).float().mean().item()
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{name}: {same:.4%} of outputs bit-equal, max |diff| {diff:.3g}")


@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])  # Qwen3-0.6B (group 2), Llama-3.1-8B (group 4)
@pytest.mark.parametrize("window", [None, 700])
def test_decode_fp8dot_ptx_equals_its_byte_spelling_and_torch_reference_gpu(heads, window, monkeypatch):
    """The PTX transpose of V (and the hardware's e4m3 cast) against "fp8dot_bytes" (shifts, the cast rounded in
    fp32: what the interpreter tests check against the torch reference) on the same wgmmas: one bf16 step apart
    at most (a wrong byte order moves outputs by tenths); both at one split near decode_fp8dot_ref (the torch
    spelling of the same roundings; the wgmma's sum order may flip an e4m3 rounding of P)."""
    import meshserve.kernels.triton_attention as ta
    from meshserve.kernels.attention_ref import decode_fp8dot_ref

    query, cache8, meta = _fp8dot_case(heads, 128, seed=11)
    assert ta._fp8_tile("fp8dot", query, cache8) == "fp8dot"
    args = (query, cache8, meta, 128**-0.5, window, 0.5, 0.25)
    ptx = ta.TritonAttentionBackend(decode_num_splits=1, fp8_path="fp8dot").attend(*args)
    monkeypatch.setattr(ta, "_fp8_tile", lambda *a: "fp8dot_bytes")
    shifts = ta.TritonAttentionBackend(decode_num_splits=1, fp8_path="fp8dot").attend(*args)
    _report(f"heads {heads} window {window} ptx vs bytes", ptx, shifts)
    torch.testing.assert_close(ptx.float(), shifts.float(), atol=1e-6, rtol=2.0**-7)
    emu = decode_fp8dot_ref(*args)
    _report(f"heads {heads} window {window} ptx vs torch reference", ptx, emu)
    torch.testing.assert_close(ptx.float(), emu.float(), atol=1e-2, rtol=1e-2)


# Qwen3-0.6B (group 2), Llama-3.1-8B (group 4), and head_dim 64 (the out^T wgmma's M at its smallest)
@pytest.mark.parametrize(("head_dim", "heads"), [(128, (16, 8)), (128, (32, 8)), (64, (16, 8))])
@pytest.mark.parametrize("window", [None, 700])
def test_decode_fp8dot_near_convert_gpu(head_dim, heads, window):
    """fp8dot over production-like shapes (contexts 1 to 3,000, a padding row) at one split, four splits (the
    reduce kernel and the inline reduce) and the split rule: within FP8DOT_TOL of today's path and of the fp32
    reference of the fp8 cache; the padding row untouched."""
    from meshserve.kernels.attention_ref import paged_attention_ref
    from meshserve.kernels.triton_attention import TritonAttentionBackend

    query, cache8, meta = _fp8dot_case(heads, head_dim, seed=head_dim + heads[0])
    args = (query, cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    ref = paged_attention_ref(query.float(), cache8, meta, head_dim**-0.5, window, 0.5, 0.25)
    for splits, inline in ((1, False), (4, False), (4, True), (None, False)):
        convert = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline).attend(*args)
        fp8dot = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline,
                                        fp8_path="fp8dot").attend(*args)
        _report(f"head_dim {head_dim} heads {heads} window {window} splits {splits} inline {inline}: fp8dot vs "
                f"convert", fp8dot, convert)
        print(f"  |fp8dot - ref| max {(fp8dot.float() - ref).abs().max().item():.3g}, |convert - ref| max "
              f"{(convert.float() - ref).abs().max().item():.3g}")
        torch.testing.assert_close(fp8dot.float(), convert.float(), atol=FP8DOT_TOL, rtol=FP8DOT_TOL)
        torch.testing.assert_close(fp8dot.float(), ref, atol=FP8DOT_TOL, rtol=FP8DOT_TOL)


@pytest.mark.parametrize("heads", [(16, 8), (32, 8)])
@pytest.mark.parametrize("splits", [1, 4])
def test_fused_decode_fp8dot_gpu(heads, splits):
    """The fused prologue's launch with fp8dot: its output near the two-step path's with the same switch (the
    words test's tolerance) and today's fp8 path's (FP8DOT_TOL), its cache the same bytes."""
    from tests.kernels.test_triton_decode_fused import run_both

    spec = ([1, 0, 300, 1000, 37, 5000], *heads, 128, 16, None)
    expect, two_step, out, fused, _, _ = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda",
                                                  fp8_path="fp8dot")
    convert = run_both(spec, torch.bfloat16, True, False, splits, seed=7, device="cuda")[2]
    torch.testing.assert_close(out.float(), expect.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), convert.float(), atol=FP8DOT_TOL, rtol=FP8DOT_TOL)
    assert torch.equal(fused.view(torch.uint8), two_step.view(torch.uint8))
    assert (out[1] == 0).all()  # the padding row


def test_decode_fp8dot_grid_tile_gpu(monkeypatch):
    """Batch 64 x 8 KV heads (past two programs per SM): the plain launch takes FP8DOT_GRID_TILE (64 tokens, 4
    warps: wgmma), equal to decode_attention called with it, and within FP8DOT_TOL of the reference."""
    import meshserve.kernels.triton_attention as ta
    from meshserve.kernels.attention_ref import paged_attention_ref

    query, cache8, meta = _fp8dot_case((16, 8), 128, seed=5, batch=64)
    args = (query, cache8, meta, 128**-0.5, None, 0.5, 0.25)
    seen = []
    launch = ta.decode_attention
    monkeypatch.setattr(ta, "decode_attention", lambda *a, **kw: (seen.append(kw), launch(*a, **kw))[1])
    out = ta.TritonAttentionBackend(decode_num_splits=1, fp8_path="fp8dot").attend(*args)
    assert (seen[0]["block_n"], seen[0]["num_warps"], seen[0]["num_stages"]) == ta.FP8DOT_GRID_TILE
    fixed = torch.empty_like(query)
    block_n, warps, stages = ta.FP8DOT_GRID_TILE
    launch(query, cache8, meta.block_tables, meta.seq_lens, meta.query_start_loc, 128**-0.5, None, fixed, 1,
           block_n=block_n, num_warps=warps, num_stages=stages, k_scale=0.5, v_scale=0.25, fp8_path="fp8dot")
    assert torch.equal(out, fixed)
    ref = paged_attention_ref(query.float(), cache8, meta, 128**-0.5, None, 0.5, 0.25)
    torch.testing.assert_close(out.float(), ref, atol=FP8DOT_TOL, rtol=FP8DOT_TOL)


@pytest.mark.parametrize("model", ["qwen3-0.6b", "llama-3.1-8b"])
def test_fp8dot_keeps_greedy_tokens_until_a_near_tie(model, monkeypatch):
    """An engine over an fp8 cache (3 dummy layers, bf16, CUDA graphs) with MESHSERVE_DECODE_FP8_PATH=fp8dot:
    greedy tokens of three prompts (contexts 40 to 1,064, batched) equal convert's up to a near-tie, logprobs
    within 0.3 before it (the fp8 weights test's bound: e4m3 roundings of q and P move them more than convert's
    fp16 ones); the decode launches took fp8dot."""
    import random

    import meshserve.kernels.triton_attention as ta
    from meshserve import LLM, SamplingParams
    from meshserve.kernels import triton_decode_fused
    from tests.near_tie import assert_agree_until_near_tie

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randint(0, 10000) for _ in range(n)]} for n in (40, 220, 1000)]
    params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=5)
    paths = []  # the fp8 path of every decode launch captured (the plain one and the fused prologue's)
    for module, name in ((ta, "decode_attention"), (triton_decode_fused, "decode_attention_fused")):
        launch = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, launch=launch, **kw: (paths.append(kw["fp8_path"]),
                                                                             launch(*a, **kw))[1])
    monkeypatch.delenv("MESHSERVE_ATTENTION_BACKEND", raising=False)
    outs = {}
    for path in ("convert", "fp8dot"):
        monkeypatch.setenv("MESHSERVE_DECODE_FP8_PATH", path)
        llm = LLM(model=model, load_format="dummy", dtype="bfloat16", kv_cache_dtype="fp8", max_model_len=2048,
                  hf_overrides={"num_hidden_layers": 3}, gpu_memory_utilization=0.5, max_num_seqs=8, seed=0,
                  enable_prefix_caching=False)
        try:
            outs[path] = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
        finally:
            llm.shutdown()
    assert "fp8dot" in paths
    for a, b in zip(outs["convert"], outs["fp8dot"]):
        d = assert_agree_until_near_tie(a, b, tie=0.3, close=0.3)
        print(f"{model}: first divergence at step {d} of {len(a.token_ids)}")
