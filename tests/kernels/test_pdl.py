"""Programmatic dependent launch (kernels/pdl.py) of the decode-path kernels.

On CPU: the switch never reaches the interpreter (no griddepcontrol there), the GEMVs' PDL layout (weights
preloaded before the wait) computes the same projection in fp32, and a subprocess compiles every PDL kernel
for sm_90 and finds griddepcontrol in the PTX exactly when USE_GDC is on. With `-m gpu`: each kernel with
PDL on equals itself with PDL off, eagerly and inside a CUDA graph.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tests.kernels.sm90 import assert_compiles_for_sm90

_HAS_CUDA = torch.cuda.is_available()

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

interp = pytest.mark.skipif(_HAS_CUDA, reason="interpreter tests run only without CUDA")
gpu = pytest.mark.gpu


def test_switch_is_scoped_and_off_by_default():
    from meshserve.kernels import pdl

    assert not pdl.is_enabled()
    with pdl.enabled():
        assert pdl.is_enabled() and pdl.resolve(None) and not pdl.resolve(False)
    assert not pdl.is_enabled() and pdl.resolve(True)


def test_step_scope_turns_pdl_off_in_prompt_carrying_forwards_of_this_thread():
    import threading

    from meshserve.kernels import pdl

    with pdl.enabled():
        with pdl.step_scope(decode_only=True):
            assert pdl.resolve(None)
        with pdl.step_scope(decode_only=False):
            assert not pdl.resolve(None) and pdl.resolve(True)  # an explicit argument still wins
            with pdl.step_scope(decode_only=True):  # nested: the inner mark, then the outer one again
                assert pdl.resolve(None)
            assert not pdl.resolve(None)
            seen = []  # the mark is per thread: another thread's forward is not this one's
            worker = threading.Thread(target=lambda: seen.append(pdl.resolve(None)))
            worker.start()
            worker.join()
            assert seen == [True]
        assert pdl.resolve(None)
    with pdl.enabled(steps="all"), pdl.step_scope(decode_only=False):  # PDL in every step, as before
        assert pdl.resolve(None)
    with pdl.enabled(False), pdl.step_scope(decode_only=True):  # the scope never turns PDL on
        assert not pdl.resolve(None)


def test_plain_turns_pdl_off_whatever_the_steps_policy():
    """pdl.plain() (the sampled decode graphs' head under MESHSERVE_PDL_HEAD=0): no PDL inside the block
    even where a decode-only scope or steps="all" would launch with it; restored after."""
    from meshserve.kernels import pdl

    with pdl.enabled(steps="all"), pdl.step_scope(decode_only=True):
        with pdl.plain():
            assert not pdl.resolve(None) and pdl.resolve(True)
        assert pdl.resolve(None)


@interp
def test_interpreter_and_cpu_never_launch_with_pdl():
    from meshserve.kernels import pdl

    with pdl.enabled():
        assert pdl.gdc_kwargs(torch.zeros(4)) == {"USE_GDC": False}
        assert pdl.gdc_kwargs(torch.zeros(4), pdl=True) == {"USE_GDC": False}


def _fake_cuda(monkeypatch, sms=132):
    """gdc_kwargs' host decisions without a GPU: an sm_90 device of `sms` SMs, outside the interpreter."""
    from types import SimpleNamespace

    from meshserve.kernels import pdl

    monkeypatch.setattr(pdl, "interpreting", lambda: False)
    monkeypatch.setattr(pdl, "_device_supports", lambda index: True)
    monkeypatch.setattr(pdl, "_num_sms", lambda index: sms)
    return SimpleNamespace(is_cuda=True, device=SimpleNamespace(index=0))


def test_policy_picks_trigger_and_one_wave_launches(monkeypatch):
    from meshserve.kernels import pdl

    x = _fake_cuda(monkeypatch)
    with pdl.enabled():  # as measured: the early trigger for every launch
        assert pdl.gdc_kwargs(x, programs=7168, num_warps=8) == {"USE_GDC": pdl.GDC_EARLY, "launch_pdl": True}
    with pdl.enabled(trigger="late"):
        assert pdl.gdc_kwargs(x) == {"USE_GDC": pdl.GDC_LATE, "launch_pdl": True}
    # an H200 holds 132 SMs x 4 programs of 8 warps (64 registers a thread), or x 8 of 4 warps
    assert pdl.one_wave_programs(132, 8) == 528 and pdl.one_wave_programs(132, 4) == 1056
    assert pdl.one_wave_programs(132, 1) == 132 * 32  # the program cap
    with pdl.enabled(one_wave_only=True):
        # Llama-3.1-8B's gate_up GEMV (28,672 rows / 4) goes plain, Qwen3-0.6B's o_proj (1,024 / 4) keeps PDL
        assert pdl.gdc_kwargs(x, programs=7168, num_warps=8) == {"USE_GDC": pdl.GDC_OFF}
        assert pdl.gdc_kwargs(x, programs=256, num_warps=4)["USE_GDC"] == pdl.GDC_EARLY
        assert pdl.gdc_kwargs(x, programs=528, num_warps=8)["USE_GDC"] and pdl.gdc_kwargs(x)["USE_GDC"]
    with pdl.enabled(False, one_wave_only=True):
        assert pdl.gdc_kwargs(x, programs=1) == {"USE_GDC": pdl.GDC_OFF}
    with pytest.raises(ValueError, match="trigger"):
        pdl.PdlPolicy(trigger="middle")


def test_gemv_preload_follows_the_policy_and_the_launch(monkeypatch):
    from meshserve.kernels import pdl

    x = _fake_cuda(monkeypatch)
    on, off = {"USE_GDC": pdl.GDC_EARLY, "launch_pdl": True}, {"USE_GDC": pdl.GDC_OFF}
    with pdl.enabled():
        assert pdl.preload_columns(x, 4096, None, on, 2048) == 2048
        assert pdl.preload_columns(x, 300, None, on, 2048) == 512
        assert pdl.preload_columns(x, 4096, None, off, 2048) == 0  # the launch went plain: the plain layout
        assert pdl.preload_columns(x, 4096, False, on, 2048) == 0
    with pdl.enabled(preload="row"):  # only rows the preload holds whole (Qwen3-0.6B's 1,024, not the 8B's 4,096)
        assert pdl.preload_columns(x, 1024, None, on, 2048) == 1024
        assert pdl.preload_columns(x, 4096, None, on, 2048) == 0
    with pdl.enabled(preload="none"):
        assert pdl.preload_columns(x, 1024, None, on, 2048) == 0


@interp
@pytest.mark.parametrize("variant", [{"trigger": "late"}, {"one_wave_only": True}, {"preload": "row"},
                                     {"preload": "none"}])
def test_interpreter_variants_compute_the_plain_or_preloaded_projection(variant):
    # the interpreter never launches with PDL: a variant changes at most the GEMV's layout. k = 2600 > MAX_PRE_K:
    # "row" and "none" keep the plain layout bit for bit; the others preload and stay within fp32 order
    from meshserve.kernels import pdl
    from meshserve.kernels.triton_gemv import gemv

    x, w = _gemv_inputs("cpu", torch.float32, 6, 2600, False)
    plain = gemv(x, w, pdl=False)
    with pdl.enabled(**variant):
        assert pdl.gdc_kwargs(x, programs=10**6) == {"USE_GDC": False}
        y = gemv(x, w)
    if variant.get("preload") in ("row", "none"):
        assert torch.equal(y, plain)
    else:
        torch.testing.assert_close(y, plain, atol=1e-5 * plain.abs().max().item(), rtol=1e-5)


def _gemv_inputs(device, dtype, n, k, gated, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(1, 2 * k if gated else k, generator=g, device=device).to(dtype)
    w = (0.05 * torch.randn(n, k, generator=g, device=device)).to(dtype)
    return x, w


@interp
@pytest.mark.parametrize("n,k,gated", [(9, 300, False), (8, 2600, False), (6, 700, True)])
def test_gemv_pdl_layout_matches_plain_and_reference_fp32(n, k, gated):
    # k = 2600 > MAX_PRE_K: the preloaded part and the loop both run
    from meshserve.kernels.triton_gemv import gemv, gemv_ref

    x, w = _gemv_inputs("cpu", torch.float32, n, k, gated)
    plain, preloaded, ref = gemv(x, w, gated=gated, pdl=False), gemv(x, w, gated=gated, pdl=True), \
        gemv_ref(x, w, gated=gated)
    for y in (plain, preloaded):
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(preloaded, plain, atol=1e-5 * plain.abs().max().item(), rtol=1e-5)


@interp
def test_rms_norm_gemv_pdl_layout_keeps_residual_and_projection():
    from meshserve.kernels.triton_gemv import rms_norm_gemv, rms_norm_gemv_ref

    g = torch.Generator().manual_seed(1)
    x, res = 3 * torch.randn(1, 2600, generator=g), torch.randn(1, 2600, generator=g)
    nw, w = 1 + 0.2 * torch.randn(2600, generator=g), 0.05 * torch.randn(8, 2600, generator=g)
    (y0, r0), (y1, r1) = rms_norm_gemv(x, res, nw, 1e-6, w, pdl=False), rms_norm_gemv(x, res, nw, 1e-6, w, pdl=True)
    ref, ref_res = rms_norm_gemv_ref(x, res, nw, 1e-6, w)
    assert torch.equal(r0, ref_res) and torch.equal(r1, ref_res)
    for y in (y0, y1):
        torch.testing.assert_close(y, ref, atol=1e-5 * ref.abs().max().item(), rtol=1e-5)


# each PDL kernel: (module, kernel, pointer dtypes, fp32 scalars, constexprs); other arguments are i32
_COMPILE_SM90 = r"""
import importlib
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

B, F = "*bf16", "*fp32"
KERNELS = [
    ("triton_gemv", "_gemv_kernel", dict(x_ptr=B, inv_ptr=B, nw_ptr=B, w_ptr=B, b_ptr=B, y_ptr=B), (),
     dict(HAS_BIAS=False, GATED=True, NORMED=False, BLOCK_N=4, BLOCK_K=256, PRE_K=2048)),
    ("triton_gemv", "_residual_rms_kernel", dict(x_ptr=B, res_ptr=B, res_out_ptr=B, inv_ptr=F), ("eps",),
     dict(HAS_RESIDUAL=True, BLOCK=4096)),
    ("triton_gemv", "_gemv_kernel", dict(x_ptr=B, inv_ptr=F, nw_ptr=B, w_ptr=B, b_ptr=B, y_ptr=B), (),
     dict(HAS_BIAS=True, GATED=False, NORMED=True, BLOCK_N=4, BLOCK_K=512, PRE_K=2048)),
    ("triton_norm_row_gemv", "_norm_row_gemv_kernel",
     dict(x_ptr=B, res_ptr=B, nw_ptr=B, w_ptr=B, b_ptr=B, y_ptr=B, h_out_ptr=B, xn_out_ptr=B), ("eps",),
     dict(HAS_RESIDUAL=True, HAS_BIAS=False, STORE_NORMED=True, BLOCK_N=4, BLOCK_K=2048)),
    ("triton_ops", "_rms_norm_kernel", dict(x_ptr=B, res_ptr=B, w_ptr=B, out_ptr=B, res_out_ptr=B), ("eps",),
     dict(HAS_RESIDUAL=True, BLOCK=1024)),
    ("triton_ops", "_silu_and_mul_kernel", dict(x_ptr=B, out_ptr=B), (), dict(BLOCK=1024)),
    ("triton_ops", "_qkv_rope_cache_kernel",
     dict(qkv_ptr=B, pos_ptr="*i64", cos_ptr=F, sin_ptr=F, qw_ptr=B, kw_ptr=B, q_out_ptr=B, cache_ptr=B,
          slot_ptr="*i64"), ("eps", "k_scale", "v_scale"),
     dict(NUM_Q_HEADS=16, NUM_KV_HEADS=8, HALF=64, BLOCK_QH=16, BLOCK_KH=8, BLOCK_HALF=64, BLOCK_SIZE=16,
          HAS_NORM=True)),
    ("triton_fp8_quant", "_quantize_fp8_rows_kernel", dict(x_ptr=B, q_ptr="*fp8e4nv", s_ptr=F), ("min_scale",),
     dict(FP8_MAX=448.0, STATIC=False, BLOCK=4096, ONE_PASS=True)),
    ("triton_fp8_fused", "_rms_norm_quant_kernel",
     dict(x_ptr=B, res_ptr=B, w_ptr=B, q_ptr="*fp8e4nv", s_ptr=F, res_out_ptr=B), ("eps", "min_scale"),
     dict(FP8_MAX=448.0, HAS_RESIDUAL=True, BLOCK=4096)),
    ("triton_fp8_fused", "_silu_and_mul_quant_kernel", dict(x_ptr=B, q_ptr="*fp8e4nv", s_ptr=F), ("min_scale",),
     dict(FP8_MAX=448.0, BLOCK=4096)),
    ("triton_attention", "_reshape_and_cache_kernel",
     dict(key_ptr=B, value_ptr=B, cache_ptr=B, slot_ptr="*i64"), ("k_scale", "v_scale"),
     dict(NUM_KV_HEADS=8, HEAD_DIM=128, BLOCK_H=8, BLOCK_D=128, BLOCK_SIZE=16, KV_FP8=False)),
    ("triton_attention", "_decode_split_kernel",
     dict(q_ptr=B, cache_ptr=B, bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32", out_ptr=B, ws_acc_ptr=F,
          ws_ml_ptr=F), ("scale_log2", "k_scale", "v_scale"),
     dict(NUM_HEADS=16, GROUP=2, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
          USE_WINDOW=False, DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=False,
          LAST_REDUCES=False, FP8_TILE="convert")),
    # the inline reduce (the last split combines the group's partials): still one wait and one trigger
    ("triton_attention", "_decode_split_kernel",
     dict(q_ptr=B, cache_ptr=B, bt_ptr="*i32", seq_lens_ptr="*i32", qsl_ptr="*i32", out_ptr=B, ws_acc_ptr=F,
          ws_ml_ptr=F, ticket_ptr="*i32"), ("scale_log2", "k_scale", "v_scale"),
     dict(NUM_HEADS=16, GROUP=2, ROWS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_SIZE=16, BLOCK_N=128,
          USE_WINDOW=False, DIRECT_OUT=False, UPCAST_DOT=False, DOT_PRECISION="tf32", KV_FP8=False,
          LAST_REDUCES=True, FP8_TILE="convert")),
    ("triton_attention", "_decode_reduce_kernel", dict(ws_acc_ptr=F, ws_ml_ptr=F, qsl_ptr="*i32", out_ptr=B), (),
     dict(NUM_HEADS=16, HEAD_DIM=128, BLOCK_D=128, SPLITS_PAD=4)),
]
for module, name, pointers, floats, const in KERNELS:
    kernel = getattr(importlib.import_module("meshserve.kernels." + module), name)
    names = list(kernel.arg_names)
    # PDL on (early and late trigger) for every kernel; off for the GEMV (its plain layout) and the attention kernels
    for use_gdc in (1, 2, False) if module != "triton_ops" else (1, 2):
        sig = {n: "i32" for n in names}
        sig.update(pointers)
        sig.update({f: "fp32" for f in floats})
        c = dict(const, USE_GDC=use_gdc)
        if not use_gdc and "PRE_K" in c:
            c["PRE_K"] = 0
        sig.update({n: "constexpr" for n in c})
        src = ASTSource(kernel, sig, constexprs={(names.index(n),): v for n, v in c.items()})
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4, "launch_pdl": bool(use_gdc)})
        ptx = compiled.asm["ptx"]
        for op in ("griddepcontrol.wait", "griddepcontrol.launch_dependents"):
            assert (ptx.count(op) == 1) == bool(use_gdc) and (op in ptx) == bool(use_gdc), (name, use_gdc, op)
        assert compiled.metadata.launch_pdl == bool(use_gdc), name
        if use_gdc:  # early: the trigger right after the wait; late: after the program's loads of activations
            between = ptx[ptx.index("griddepcontrol.wait"):ptx.index("griddepcontrol.launch_dependents")]
            assert ("ld.global" in between) == (use_gdc == 2), (name, use_gdc)
print("compiled")
"""


@pytest.mark.skipif(_HAS_CUDA, reason="the GPU tests run the kernels on the real device")
def test_pdl_kernels_compile_for_sm90_with_griddepcontrol_only_when_on():
    assert_compiles_for_sm90(_COMPILE_SM90)


# ----------------------------------------------------------------------------------------------------------
# GPU tests (-m gpu): PDL on equals PDL off, eagerly and replayed in a CUDA graph (Qwen3-0.6B's and the 8B's
# shapes). The decode-path engine tests compare whole generations (tests/engine/test_pdl_decode.py).
# ----------------------------------------------------------------------------------------------------------
def _chain(x, res, nw, w_qkv, w_o, pdl):
    """norm -> GEMV -> folded norm+GEMV -> SiLU -> GEMV: a layer's kernels back to back, each one's input the
    previous one's output (what a PDL race would corrupt)."""
    from meshserve.kernels.triton_gemv import gemv, rms_norm_gemv
    from meshserve.kernels.triton_ops import rms_norm, silu_and_mul

    with torch.no_grad():
        from meshserve.kernels import pdl as pdl_mod

        with pdl_mod.enabled(pdl):
            h, r = rms_norm(x, nw, 1e-6, res)
            q = gemv(h, w_qkv)
            y, r2 = rms_norm_gemv(q[..., : x.shape[-1]], r, nw, 1e-6, w_qkv)
            a = silu_and_mul(y)
            return gemv(a, w_o), r2


@gpu
@pytest.mark.parametrize("k,n", [(1024, 4096), (4096, 12288)])
def test_pdl_chain_equals_plain_eager_and_in_graph(k, n):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, k, generator=g, device="cuda").bfloat16()
    res = torch.randn(1, k, generator=g, device="cuda").bfloat16()
    nw = (1 + 0.2 * torch.randn(k, generator=g, device="cuda")).bfloat16()
    w_qkv = (0.05 * torch.randn(n, k, generator=g, device="cuda")).bfloat16()
    w_o = (0.05 * torch.randn(k, n // 2, generator=g, device="cuda")).bfloat16()
    plain, plain_res = _chain(x, res, nw, w_qkv, w_o, False)
    eager, eager_res = _chain(x, res, nw, w_qkv, w_o, True)
    assert torch.equal(eager_res, plain_res)
    # the preloaded layout sums in two parts: a few bf16 ulps at most
    torch.testing.assert_close(eager.float(), plain.float(), atol=0.02 * plain.abs().max().item(), rtol=0.02)
    _chain(x, res, nw, w_qkv, w_o, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        graphed, graphed_res = _chain(x, res, nw, w_qkv, w_o, True)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(graphed, eager) and torch.equal(graphed_res, eager_res)
