"""Triton compiles one copy of a kernel per specialization of its integer arguments (== 1, a multiple of 16):
per-step counts, seeds and strides of per-step tensors are left unspecialized (do_not_specialize), so a new
value never compiles inside serving (issue 18). Triton checks those names only when it compiles, on a GPU:
here they are checked statically against each kernel's parameters, and the audited per-step arguments are
pinned so that a later edit cannot drop one unnoticed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import meshserve.kernels as kernels_pkg

# kernel -> its arguments whose value changes per step or per request (counts, seeds, block-table widths). Left
# specialized on purpose: the batch-1 GEMVs' row counts (decode graphs capture every batch size at start-up, and
# their BLOCK_M constexpr follows the count anyway)
PER_STEP = {
    "triton_unified_attention._unified_attention_kernel": {
        "num_tokens",
        "num_seqs",
        "search_steps",
        "stride_btb",
    },
    "triton_unified_persistent._unified_persistent_kernel": {"num_tokens", "num_seqs", "stride_btb"},
    "triton_unified_persistent._unified_work_kernel": {"num_seqs"},
    "triton_attention._prefill_attention_kernel": {"stride_btb"},
    "triton_attention._decode_split_kernel": {"num_splits", "stride_btb"},
    "triton_attention._decode_reduce_kernel": {"num_splits"},
    "triton_mla._mla_decode_split_kernel": {"num_splits", "stride_btb"},
    "triton_mla_balanced._mla_balanced_kernel": {"num_seqs", "stride_btb"},
    "triton_sampling._sample_gumbel_kernel": {"seed", "chunk_cols", "num_chunks"},
    "triton_sampling._gumbel_reduce_kernel": {"num_chunks"},
    "triton_fp8_block._fp8_block_gemm_kernel": {"M"},
    "triton_quant._int4_matmul_kernel": {"M"},
    "triton_moe._grouped_gemm_kernel": {"num_pairs", "num_rows_padded"},
    # the chunk plan's rows of [K, B] tensors (16-byte aligned or not with k * B) and the step's offsets
    "triton_mla_prefill._mla_prefill_kernel": {"ctx_loc_ptr", "ctx_len_ptr", "q_off_ptr", "qsl_ptr"},
    "triton_lse_merge._merge_lse_kernel": {"qsl_ptr"},
    "triton_moe_align._count_kernel": {"num_pairs"},
    "triton_moe_align._plan_kernel": {"num_pairs", "num_rows_padded"},
    "triton_moe_align._scatter_kernel": {"num_pairs"},
    "triton_moe_gemv._gate_up_gemv_kernel": {"num_pairs"},
    "triton_moe_gemv._down_sum_gemv_kernel": {"num_pairs"},
}


def _is_kernel(obj) -> bool:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return isinstance(obj, (JITFunction, InterpretedFunction))


def _kernels() -> dict[str, object]:
    """Every @triton.jit function defined in meshserve.kernels, by 'module.name'."""
    found = {}
    for info in pkgutil.iter_modules(kernels_pkg.__path__):
        mod = importlib.import_module(f"meshserve.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if _is_kernel(obj) and obj.fn.__module__ == mod.__name__:
                found[f"{info.name}.{name}"] = obj
    return found


def _unspecialized(kernel) -> list:
    """The kernel's do_not_specialize list (a JITFunction's attribute; the interpreter keeps its kwargs)."""
    if hasattr(kernel, "do_not_specialize"):
        return list(kernel.do_not_specialize)
    return list(kernel.kwargs.get("do_not_specialize") or [])


def _runtime_params(kernel) -> list[str]:
    """Parameter names that are runtime arguments (not tl.constexpr)."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [p.name for p in params if "constexpr" not in str(p.annotation)]


def test_do_not_specialize_names_are_runtime_parameters():
    found = _kernels()
    assert len(found) > 40  # the scan sees the kernels at all
    for key, kernel in found.items():
        runtime = _runtime_params(kernel)
        for name in _unspecialized(kernel):
            assert isinstance(name, str), f"{key}: name parameters, not positions ({name!r})"
            assert name in runtime, f"{key}: do_not_specialize names {name!r}, not a runtime parameter"


def test_jit_helpers_have_no_string_defaults():
    """A @triton.jit helper (called from a kernel, not launched; kernels end in _kernel) takes no str default:
    Triton 3.6 (the device image's) passes a called function's default str through unwrapped and the calling
    kernel fails to compile ("'str' object has no attribute 'type'"); 3.9 (CI's) compiles it, so only this
    check catches it here. A launched kernel's defaults are bound by its launcher and are fine."""
    helpers = {key: k for key, k in _kernels().items() if not key.endswith("_kernel")}
    assert "triton_attention_tile.attend_paged_kv_tile" in helpers  # the scan sees the helpers at all
    for key, helper in helpers.items():
        for p in inspect.signature(helper.fn).parameters.values():
            assert not isinstance(p.default, str), f"{key}: {p.name} defaults to {p.default!r}; pass it explicitly"


@pytest.mark.parametrize("key", sorted(PER_STEP))
def test_per_step_arguments_are_unspecialized(key):
    kernel = _kernels()[key]
    missing = PER_STEP[key] - set(_unspecialized(kernel))
    assert not missing, f"{key} specializes per-step arguments {sorted(missing)}"


def test_work_list_width_is_one_constexpr_up_to_256_sequences():
    from meshserve.kernels.triton_unified_persistent import work_list_width

    assert {work_list_width(n) for n in (1, 2, 3, 17, 100, 255, 256)} == {256}
    assert work_list_width(257) == 512 and work_list_width(1024) == 1024


# -- launches: what Triton specializes on must not split one kernel variant by per-call values -------------


def _specialization(kernel, args, kwargs) -> tuple[tuple, tuple]:
    """(variant, specialization) of a launch as a CUDA Triton would key it: variant = constexprs, launch
    options and argument types; specialization = each runtime argument's == 1 / divisible-by-16 /
    16-byte-aligned attribute, honouring do_not_specialize (Triton's own specialize_impl, on the host tensors'
    addresses)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    params = inspect.signature(kernel.fn).parameters
    names = list(params)
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in params}
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k not in params))
    dns = set(_unspecialized(kernel))
    variant, attrs = [options], []
    for name, p in params.items():
        value = bound[name]
        if "constexpr" in str(p.annotation):
            variant.append((name, value))
            continue
        ty, attr = native_specialize_impl(CUDABackend, value, False, name not in dns, True)
        variant.append((name, ty))
        attrs.append((name, attr))
    return tuple(variant), tuple(attrs)


class _Recorder:
    """Stands in for a kernel (kernel[grid](...)): records each launch's _specialization, runs nothing."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.launches: list[tuple[tuple, tuple]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(_specialization(self.kernel, args, kwargs))

    def split_variants(self) -> dict:
        """variant -> its specializations, where one variant met more than one (a compile inside serving)."""
        seen: dict = {}
        for variant, attrs in self.launches:
            seen.setdefault(variant, set()).add(attrs)
        return {v: a for v, a in seen.items() if len(a) > 1}


@pytest.mark.parametrize("shared", [0, 2], ids=["routed", "fuse-shared"])
@pytest.mark.parametrize("num_experts, top_k", [(64, 6), (8, 4)])
def test_grouped_moe_gemm_compiles_once_per_tile_config(num_experts, top_k, shared, monkeypatch):
    """Every token count of one tile config launches the grouped GEMM (and the pair GEMV) with one
    specialization: the unquantized path's unused scale strides are fixed, not the pair count (issue 29);
    with a shared MLP folded in (MESHSERVE_MOE_FUSE_SHARED) its slices' strides are the model's, fixed too."""
    import torch

    from meshserve.kernels import triton_moe

    grouped, pair = _Recorder(triton_moe._grouped_gemm_kernel), _Recorder(triton_moe._pair_gemv_kernel)
    monkeypatch.setattr(triton_moe, "_grouped_gemm_kernel", grouped)
    monkeypatch.setattr(triton_moe, "_pair_gemv_kernel", pair)
    monkeypatch.setattr(triton_moe, "_combine_kernel", _Recorder(triton_moe._combine_kernel))
    hidden, width = 64, 32
    gen = torch.Generator().manual_seed(0)
    w13 = torch.randn(num_experts, 2 * width, hidden, generator=gen).bfloat16()
    w2 = torch.randn(num_experts, hidden, width, generator=gen).bfloat16()
    fold = {} if not shared else {"shared_w13": torch.randn(2 * shared * width, hidden, generator=gen).bfloat16(),
                                  "shared_w2": torch.randn(hidden, shared * width, generator=gen).bfloat16()}
    for tokens in (2, 3, 5, 8, 11, 16, 21, 22, 23, 40, 64, 100, 257, 300):
        x = torch.randn(tokens, hidden, generator=gen).bfloat16()
        ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(tokens)]).int()
        weights = torch.rand(tokens, top_k, generator=gen)
        triton_moe.fused_experts(x, w13, w2, weights, ids, **fold)
    assert len({v for v, _ in grouped.launches}) >= 2 * 3  # several tile configs, two stages each
    assert not grouped.split_variants() and not pair.split_variants()


def test_mla_prefill_and_merge_compile_once_per_tile(monkeypatch):
    """Steps of one, three and five sequences whose contexts span several workspace chunks: the chunk plan's
    per-chunk rows start at any 8-byte offset, yet each (BLOCK_Q, LSE, output dtype) variant of the prefill
    kernel, and each merge variant, is launched with one specialization."""
    import torch

    from meshserve.kernels import triton_lse_merge, triton_mla_prefill
    from meshserve.kernels.mla_prefill import mla_prefill
    from tests.kernels.test_mla_prefill import _case, _workspace

    prefill = _Recorder(triton_mla_prefill._mla_prefill_kernel)
    merge = _Recorder(triton_lse_merge._merge_lse_kernel)
    monkeypatch.setattr(triton_mla_prefill, "_mla_prefill_kernel", prefill)
    monkeypatch.setattr(triton_lse_merge, "_merge_lse_kernel", merge)
    steps = [([20], [75]), ([7, 20, 3], [7, 75, 3]), ([1, 7, 1, 20, 3], [9, 7, 30, 75, 3]),
             ([30, 2], [90, 40])]
    for q_lens, seq_lens in steps:
        meta, cache, q_nope, q_pe, kv_b, scale, ref, _ = _case(q_lens, seq_lens, 16, torch.float32)
        out = torch.zeros(q_nope.shape[0], q_nope.shape[1], ref.shape[2])
        ws = _workspace(16, q_nope, kv_b, ref.shape[2], max_query_tokens=64)
        mla_prefill(q_nope, q_pe, cache, kv_b, meta, scale, out, triton=True, workspace=ws)
    assert len(prefill.launches) > 20 and len(merge.launches) > 15
    assert not prefill.split_variants(), prefill.split_variants()
    assert not merge.split_variants(), merge.split_variants()
