"""The decode attention launch with the prologue inside it (kernels/triton_decode_fused.py) against the two-step
path it replaces (TritonAttentionBackend.write_qkv, then attend), on the same inputs: in the interpreter the
attention outputs and the KV cache bytes identical after the call (bf16 and an fp8 cache too); on the GPU the
outputs to the decode tests' tolerances.

Without CUDA the kernels run in the Triton CPU interpreter (tests/conftest.py) on tiny shapes.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.quant_ref import FP8_DTYPE
from tests.kernels.sm90 import COMPILE_SM90_PRELUDE, assert_compiles_for_sm90
from tests.kernels.test_triton_attention import _tol, make_case

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")

if importlib.util.find_spec("triton") is not None:
    from meshserve.kernels.triton_attention import TritonAttentionBackend

FUSED_CASES = [
    # seq_lens (0: a CUDA-graph padding row, slot -1), H, Hkv, D, block_size, window
    ([5, 0, 300, 1], 4, 2, 16, 16, None),  # context 1, a padding row, three 128-token tiles
    ([130, 7], 16, 8, 128, 16, None),  # Qwen3-0.6B's heads: GQA 2, head_dim 128
    ([77, 260, 1], 8, 2, 32, 8, 50),  # GQA 4, a sliding window shorter than a tile
    ([3, 40], 6, 2, 24, 4, None),  # GQA 3, head_dim 24: halves of 12 in 16-wide blocks, padded lanes
]


def _rope_tables(max_pos: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / 10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def fused_case(case, dtype: torch.dtype, fp8: bool, qk_norm: bool, seed: int = 0, pad_slot: bool = False,
               device: str = "cpu"):
    """(qkv, positions, cos, sin, q_norm_w, k_norm_w, cache, meta, h, hkv, window, k_scale, v_scale): one decode
    step of FUSED_CASES[case] (or of the tuple `case`), each row's token at position seq_len - 1 with its slot
    through the block table; padding rows (seq_len 0) get position 0 and slot -1 (pad_slot: offset 1 of a
    block no sequence reads)."""
    seq_lens, h, hkv, d, bs, window = FUSED_CASES[case] if isinstance(case, int) else case
    _, cache, meta = make_case([1] * len(seq_lens), [max(1, n) for n in seq_lens], h, hkv, d, bs, dtype, seed=seed)
    meta.seq_lens = torch.tensor(seq_lens, dtype=torch.int32)
    meta.seq_lens_cpu = list(seq_lens)
    free = min(set(range(cache.shape[1])) - set(meta.block_tables.flatten().tolist()))
    slots = [int(meta.block_tables[i, (n - 1) // bs]) * bs + (n - 1) % bs if n else free * bs + 1 if pad_slot else -1
             for i, n in enumerate(seq_lens)]
    meta.slot_mapping = torch.tensor(slots, dtype=torch.int64)
    g = torch.Generator().manual_seed(seed + 1)
    qkv = (2 * torch.randn(len(seq_lens), (h + 2 * hkv) * d, generator=g)).to(dtype)
    positions = torch.tensor([max(0, n - 1) for n in seq_lens], dtype=torch.int64)
    cos, sin = _rope_tables(max(seq_lens) + 1, d)
    norms = [(1 + 0.3 * torch.randn(d, generator=g)).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    k_scale, v_scale = 1.0, 1.0
    if fp8:
        k_scale, v_scale = 0.05, 1 / 256  # |v| / v_scale saturates at 448 now and then
        cache = (torch.randn(cache.shape, generator=g) * 8).to(FP8_DTYPE)
    for name in ("slot_mapping", "query_start_loc", "seq_lens", "block_tables"):
        setattr(meta, name, getattr(meta, name).to(device))
    qkv, positions, cos, sin, cache = (t.to(device) for t in (qkv, positions, cos, sin, cache))
    norms = [None if w is None else w.to(device) for w in norms]
    return qkv, positions, cos, sin, *norms, cache, meta, h, hkv, window, k_scale, v_scale


def run_both(case, dtype, fp8, qk_norm, splits, inline=False, seed=0, pad_slot=False, device="cpu",
             fp8_path="convert"):
    """(two-step out, two-step cache, fused out, fused cache, cache before, meta) from the same inputs."""
    qkv, pos, cos, sin, qw, kw, cache, meta, h, hkv, window, ks, vs = fused_case(case, dtype, fp8, qk_norm, seed,
                                                                                 pad_slot, device)
    d = cache.shape[-1]
    backend = TritonAttentionBackend(decode_num_splits=splits, inline_reduce=inline, fp8_path=fp8_path)
    two_step = cache.clone()
    q = backend.write_qkv(qkv, pos, cos, sin, qw, kw, 1e-6, two_step, meta.slot_mapping, h, hkv, ks, vs)
    expect = backend.attend(q, two_step, meta, d**-0.5, window, ks, vs)
    fused = cache.clone()
    out = backend.attend_qkv(qkv, pos, cos, sin, qw, kw, 1e-6, fused, meta, d**-0.5, window, h, hkv, ks, vs)
    return expect, two_step, out, fused, cache, meta


def _bytes(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(torch.uint8)


def _assert_same(expect, two_step, out, fused, before, meta):
    assert out.shape == expect.shape and out.dtype == expect.dtype
    # the interpreter runs both paths' math as written: the same roundings in the same order give the same
    # bits, outputs as well as cache (bf16 and fp8 too); on a GPU only the compiled code's choices may differ
    assert torch.equal(_bytes(out), _bytes(expect))
    assert torch.equal(_bytes(fused), _bytes(two_step))
    written = meta.slot_mapping >= 0
    assert not torch.equal(_bytes(fused), _bytes(before)) or not written.any()  # the step's K/V went in
    pad = (meta.seq_lens == 0).nonzero().flatten()
    assert (out[pad] == 0).all()  # seq_len 0: zeros, as the split kernel gives


def _params():
    """case x dtype x q/k norm x splits (one: the direct output; three: the workspace and the reduce kernel),
    and an fp8 cache (bf16 model, the served case) over case x norm x splits."""
    for case in range(len(FUSED_CASES)):
        for qk_norm in (True, False):
            for splits in (1, 3):
                for dtype in (torch.float32, torch.bfloat16):
                    yield pytest.param(case, dtype, False, qk_norm, splits)
                yield pytest.param(case, torch.bfloat16, True, qk_norm, splits)


@interp
@pytest.mark.parametrize(("case", "dtype", "fp8", "qk_norm", "splits"), list(_params()))
def test_fused_matches_two_step_interp(case, dtype, fp8, qk_norm, splits):
    _assert_same(*run_both(case, dtype, fp8, qk_norm, splits, seed=case))


@interp
@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_fused_inline_reduce_interp(case):
    """With the inline reduce (no reduce launch) the fused launch matches the two-step path too, and leaves
    every ticket at zero for the next launch (run twice over the same tickets)."""
    from meshserve.kernels import triton_attention

    for _ in range(2):
        _assert_same(*run_both(case, torch.float32, False, True, 4, inline=True, seed=30 + case))
        assert not triton_attention._ticket_workspace(torch.device("cpu")).any()


@interp
@pytest.mark.parametrize("case", range(len(FUSED_CASES)))
def test_the_split_that_reads_the_token_writes_it_interp(case, monkeypatch):
    """The current token's K/V are written by the program that reads them back (on a GPU nothing orders the
    programs of a launch): with the interpreter's splits run last-first, a writer ahead of the reader would
    leave it the stale slot (the interpreter's in-order grid hides that otherwise)."""
    from triton.runtime import interpreter

    builder = interpreter.interpreter_builder
    real = builder.set_grid_idx
    monkeypatch.setattr(builder, "set_grid_idx", lambda x, y, z: real(x, y, builder.grid_dim[2] - 1 - z))
    _assert_same(*run_both(case, torch.float32, False, case != 1, 3, seed=40 + case))


@interp
@pytest.mark.parametrize("splits", [1, 3])
def test_a_slot_without_context_is_still_written_interp(splits):
    """A row with seq_len 0 but a slot (not what the engine builds; write_qkv writes it regardless): the fused
    launch writes it too (split 0), and the row attends to nothing."""
    expect, two_step, out, fused, before, meta = run_both(0, torch.float32, False, True, splits, pad_slot=True)
    slot = int(meta.slot_mapping[1])
    assert slot >= 0 and not torch.equal(two_step[:, slot // 16, slot % 16], before[:, slot // 16, slot % 16])
    _assert_same(expect, two_step, out, fused, before, meta)


@interp
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", [0, 1])
def test_fused_words_fp8_path_interp(case, splits):
    """MESHSERVE_DECODE_FP8_PATH=words reaches the fused launch too: its outputs and cache equal the two-step
    path's with the same switch, and its outputs equal today's fp8 path's (kernels/triton_e4m3_words.py)."""
    words = run_both(case, torch.bfloat16, True, False, splits, seed=case, fp8_path="words")
    _assert_same(*words)
    convert = run_both(case, torch.bfloat16, True, False, splits, seed=case)
    torch.testing.assert_close(words[2].float(), convert[2].float(), atol=1e-5, rtol=1e-5)


@interp
@pytest.mark.parametrize("case", [0, 2])
@pytest.mark.parametrize("splits", [1, 3])
def test_fused_fp8_transposed_v_interp(case, splits, monkeypatch):
    """MESHSERVE_FP8_V_LAYOUT=transposed (kernels/kv_layout.py): the fused launch writes the token's V into its
    block's [Hkv, D, block_size] layout and reads it back as the two-step path does, bit for bit."""
    monkeypatch.setenv("MESHSERVE_FP8_V_LAYOUT", "transposed")
    _assert_same(*run_both(case, torch.bfloat16, True, False, splits, seed=case))


@interp
def test_fused_rejects_prompt_steps_interp():
    qkv, pos, cos, sin, qw, kw, cache, meta, h, hkv, *_ = fused_case(0, torch.float32, False, True)
    meta.max_query_len = 2  # a step with a prompt chunk: the two-step path's
    with pytest.raises(ValueError, match="decode-only"):
        TritonAttentionBackend().attend_qkv(qkv, pos, cos, sin, qw, kw, 1e-6, cache, meta, 0.25, None, h, hkv)


_COMPILE_SM90 = COMPILE_SM90_PRELUDE + """
from meshserve.kernels.triton_decode_fused import _decode_fused_split_kernel
sig = dict(qkv_ptr="*bf16", pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", qw_ptr="*bf16", kw_ptr="*bf16",
           slot_ptr="*i64", cache_ptr="*bf16", bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32", out_ptr="*bf16",
           ws_acc_ptr="*fp32", ws_ml_ptr="*fp32", ticket_ptr="*i32", eps="fp32", scale_log2="fp32", k_scale="fp32",
           v_scale="fp32", stride_ckv="i64", stride_cb="i64")
# V_T (V transposed in each block: kernels/kv_layout.py) always given: a default reaches the called functions as
# a bare value under ASTSource (a runtime branch, both arms compiled)
tile = dict(HEAD_DIM=128, HALF=64, BLOCK_D=128, BLOCK_HALF=64, BLOCK_SIZE=16, BLOCK_N=128, UPCAST_DOT=False,
            DOT_PRECISION="tf32", V_T=False)
# Qwen3-0.6B at W1: q/k norms, one split writing the output, PDL's late trigger
qwen = dict(tile, NUM_HEADS=16, NUM_KV_HEADS=8, GROUP=2, ROWS=16, BLOCK_KH=8, HAS_NORM=True, USE_WINDOW=False,
            DIRECT_OUT=True, KV_FP8=False, USE_GDC=2, LAST_REDUCES=False, FP8_TILE="convert")
ptx = compile_sm90(_decode_fused_split_kernel, sig, qwen, 4, 3).asm["ptx"]
assert "bar.sync" in ptx and "mma" in ptx and "griddepcontrol.wait" in ptx
# Llama-3.1-8B over an fp8 cache: no norms, splits reduced inline, a window
sig.update(cache_ptr="*fp8e4nv")
llama = dict(tile, NUM_HEADS=32, NUM_KV_HEADS=8, GROUP=4, ROWS=16, BLOCK_KH=8, HAS_NORM=False, USE_WINDOW=True,
             DIRECT_OUT=False, KV_FP8=True, USE_GDC=0, LAST_REDUCES=True)
for fp8_tile, v_t in (("convert", False), ("words", False), ("convert", True)):  # + MESHSERVE_FP8_V_LAYOUT
    ptx = compile_sm90(_decode_fused_split_kernel, sig, dict(llama, FP8_TILE=fp8_tile, V_T=v_t), 4, 3).asm["ptx"]
    # the K/V write saturates to e4m3 as the prologue does; the tiles read e4m3 pairs straight into fp16
    assert "cvt.rn.satfinite.e4m3x2.f32" in ptx and "cvt.rn.f16x2.e4m3x2" in ptx and "atom" in ptx
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests compile the kernels for the real device")
def test_fused_kernel_compiles_for_sm90_without_gpu():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU: the compiled kernel at the W1 models' heads (-m gpu)
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not _HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(("heads", "qk_norm"), [((16, 8), True), ((32, 8), False)])  # Qwen3-0.6B, Llama-3.1-8B
@pytest.mark.parametrize(("dtype", "fp8"), [(torch.bfloat16, False), (torch.float32, False), (torch.bfloat16, True)])
@pytest.mark.parametrize("splits", [1, 4, None])
@pytest.mark.parametrize(("inline", "window"), [(False, None), (True, None), (False, 200)])
def test_fused_matches_two_step_gpu(heads, qk_norm, dtype, fp8, splits, inline, window):
    """Contexts 1 to 5,000 and a padding row at head_dim 128: the outputs to the decode tests' GPU tolerance, V
    bytes identical, K bytes identical without q/k norms (rope alone: elementwise) and with them all but the
    rare last-bit difference of the per-head variance's summation order (at most one step of the cache's
    format)."""
    from meshserve.kernels.triton_attention import _ticket_workspace

    spec = ([1, 0, 300, 1000, 37, 5000], *heads, 128, 16, window)
    expect, two_step, out, fused, before, _ = run_both(spec, dtype, fp8, qk_norm, splits, inline, seed=7,
                                                       device="cuda")
    atol, rtol = _tol(dtype, on_gpu=True)
    torch.testing.assert_close(out.float(), expect.float(), atol=atol, rtol=rtol)
    assert (out[1] == 0).all()  # the padding row
    assert torch.equal(_bytes(fused[1]), _bytes(two_step[1]))  # V
    same_k = _bytes(fused[0]) == _bytes(two_step[0])
    if not qk_norm:
        assert same_k.all()
    else:
        assert same_k.float().mean() > 0.999, f"{int((~same_k).sum())} K bytes differ"
        step = 2**-3 if fp8 else 2**-7 if dtype == torch.bfloat16 else 2**-22
        torch.testing.assert_close(fused[0].float(), two_step[0].float(), atol=1e-6, rtol=step)
    assert not torch.equal(_bytes(fused), _bytes(before))
    assert not _ticket_workspace(out.device).any()
