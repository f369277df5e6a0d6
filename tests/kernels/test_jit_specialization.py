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
    "triton_sampling._sample_gumbel_kernel": {"seed"},
    "triton_fp8_block._fp8_block_gemm_kernel": {"M"},
    "triton_quant._int4_matmul_kernel": {"M"},
    "triton_moe._grouped_gemm_kernel": {"num_pairs", "num_rows_padded"},
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


@pytest.mark.parametrize("key", sorted(PER_STEP))
def test_per_step_arguments_are_unspecialized(key):
    kernel = _kernels()[key]
    missing = PER_STEP[key] - set(_unspecialized(kernel))
    assert not missing, f"{key} specializes per-step arguments {sorted(missing)}"


def test_work_list_width_is_one_constexpr_up_to_256_sequences():
    from meshserve.kernels.triton_unified_persistent import work_list_width

    assert {work_list_width(n) for n in (1, 2, 3, 17, 100, 255, 256)} == {256}
    assert work_list_width(257) == 512 and work_list_width(1024) == 1024
