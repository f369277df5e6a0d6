"""The log-sum-exp merge (kernels/lse_merge.py, kernels/triton_lse_merge.py): merging attention over two
disjoint key sets gives attention over their union, including rows where one side (or both) saw no key;
the Triton kernel (interpreter without CUDA) equals the torch reference and leaves short sequences' rows
alone."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.lse_merge import merge_lse_ref, merged_rows

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")

# sequences of 3, 1 (a decode row: not merged) and 4 query rows
QSL = [0, 3, 4, 8]


def _attend(q, k, v, visible):
    """Attention over the visible keys and its natural-log LSE; -inf and zeros where none is visible."""
    scores = torch.einsum("thd,khd->thk", q, k).masked_fill(~visible[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.einsum("thk,khv->thv", p, v), lse


def _halves():
    """Queries over 10 keys split 6 + 4; row 0 sees only the second half, row 2 only the first, row 5 none."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(8, 2, 16, generator=g), torch.randn(10, 2, 16, generator=g),
               torch.randn(10, 2, 12, generator=g))  # fmt: skip
    visible = torch.rand(8, 10, generator=g) < 0.7
    visible[0, :6] = False
    visible[0, 6] = True
    visible[2, 6:] = False
    visible[2, 0] = True
    visible[5] = False
    first, second = visible.clone(), visible.clone()
    first[:, 6:] = False
    second[:, :6] = False
    return (q, k, v), visible, first, second


def _merge(fn, dtype):
    (q, k, v), visible, first, second = _halves()
    a, a_lse = _attend(q, k, v, first)
    b, b_lse = _attend(q, k, v, second)
    full, full_lse = _attend(q, k, v, visible)
    out = torch.full_like(a, 7.0, dtype=dtype)
    out_lse = torch.full_like(a_lse, 7.0)
    fn(out, out_lse, a.to(dtype), a_lse, b.to(dtype), b_lse)
    return out, out_lse, full, full_lse, (a_lse, b_lse)


def _check(out, out_lse, full, full_lse, sides, tol):
    a_lse, b_lse = sides
    assert torch.isinf(a_lse[0]).all() and torch.isinf(b_lse[2]).all() and torch.isinf(a_lse[5]).all()
    rows = merged_rows(QSL, 2)
    assert rows == [0, 1, 2, 4, 5, 6, 7]
    torch.testing.assert_close(out[rows].float(), full[rows], atol=tol, rtol=tol)
    torch.testing.assert_close(out_lse[rows], full_lse[rows], atol=1e-5, rtol=1e-5)
    assert torch.equal(out[5].float(), torch.zeros_like(out[5].float())) and torch.isinf(out_lse[5]).all()
    assert bool((out[3] == 7.0).all()) and bool((out_lse[3] == 7.0).all()), "a decode row is left alone"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_merge_of_two_halves_is_attention_over_all_keys(dtype):
    out, out_lse, full, full_lse, sides = _merge(lambda *t: merge_lse_ref(*t, QSL, 2), dtype)
    _check(out, out_lse, full, full_lse, sides, 1e-5 if dtype == torch.float32 else 2e-2)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_merge_of_two_halves_is_attention_over_all_keys(dtype):
    from meshserve.kernels.triton_lse_merge import merge_lse

    device = "cuda" if torch.cuda.is_available() else "cpu"
    qsl = torch.tensor(QSL, device=device)

    def run(out, out_lse, a, a_lse, b, b_lse):
        moved = [t.to(device) for t in (out, out_lse, a, a_lse, b, b_lse)]
        merge_lse(*moved, qsl, 4, 2)
        out.copy_(moved[0].cpu())
        out_lse.copy_(moved[1].cpu())

    out, out_lse, full, full_lse, sides = _merge(run, dtype)
    _check(out, out_lse, full, full_lse, sides, 1e-5 if dtype == torch.float32 else 2e-2)


@needs_triton
def test_triton_merge_in_place_equals_reference():
    """out aliasing a (the running accumulator), random LSEs with -inf on either side and on both."""
    from meshserve.kernels.triton_lse_merge import merge_lse

    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(8, 3, 20, generator=g), torch.randn(8, 3, 20, generator=g)
    a_lse, b_lse = torch.randn(8, 3, generator=g) * 5, torch.randn(8, 3, generator=g) * 5
    a_lse[0, 0] = b_lse[1, 2] = float("-inf")
    a_lse[6, 1] = b_lse[6, 1] = float("-inf")
    ref, ref_lse = a.clone(), a_lse.clone()
    merge_lse_ref(ref, ref_lse, ref, ref_lse, b, b_lse, QSL, 2)
    merge_lse(a, a_lse, a, a_lse, b, b_lse, torch.tensor(QSL), 4, 2)
    torch.testing.assert_close(a, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(a_lse, ref_lse)
    assert torch.equal(a[6, 1], torch.zeros(20)) and a_lse[6, 1] == float("-inf")
