"""The Triton align (kernels/triton_moe_align.py) against triton_moe's torch align: the same padded runs,
block experts and padded total; within an expert's run the pairs may come in another order on a GPU (its
atomics race), so runs are compared as sets. Also the grouped GEMM path it feeds, tuned and legacy tables."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from meshserve.kernels.moe_ref import fused_experts_ref
from tests.kernels.sm90 import assert_compiles_for_sm90
from tests.kernels.test_triton_moe import _case

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
interp = pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter tests run only without CUDA")


def assert_same_runs(got: tuple, want: tuple, block_m: int, every_block: bool = False) -> None:
    """Two alignments (sorted_rows, block_expert, num_padded): the same padded total, block experts (every_block:
    the blocks past the total too), padding, and pairs in each expert's run. Where a run spans several blocks the
    chunks' atomics may order its pairs differently, so runs are compared as sets, not blocks."""
    rows, block_expert, used = got
    ref_rows, ref_block_expert, ref_used = want
    assert rows.shape == ref_rows.shape and block_expert.shape == ref_block_expert.shape
    n_used = int(used)
    assert n_used == int(ref_used)
    blocks = slice(None) if every_block else slice(0, n_used // block_m)
    assert torch.equal(block_expert[blocks], ref_block_expert[blocks])
    assert torch.equal(rows[n_used:], ref_rows[n_used:])  # all padding
    owners = block_expert[: n_used // block_m].tolist()
    start = 0
    while start < len(owners):
        end = start
        while end < len(owners) and owners[end] == owners[start]:
            end += 1
        span = slice(start * block_m, end * block_m)
        assert torch.equal(rows[span].sort().values, ref_rows[span].sort().values), (owners[start], start)
        start = end


def _assert_same_alignment(ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    from meshserve.kernels import triton_moe, triton_moe_align

    assert_same_runs(triton_moe_align.align_by_expert(ids, num_experts, block_m),
                     triton_moe.align_by_expert(ids, num_experts, block_m), block_m)


@interp
@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(3, 4, 2, 4), (70, 10, 3, 16), (37, 32, 4, 8)])
def test_align_matches_torch_align(tokens, experts, top_k, block_m):
    """Several chunks of 64 pairs (one expert's run spanning them), experts with no pair, ids of -1."""
    gen = torch.Generator().manual_seed(tokens)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)]).to(torch.int32)
    ids[ids == experts - 1] = -1
    _assert_same_alignment(ids, experts, block_m)


@interp
@pytest.mark.parametrize("table", ["legacy", "explicit", "stream"])
def test_grouped_gemm_with_legacy_and_explicit_configs_matches_reference(table):
    """The legacy table (torch align, zero + sum), explicit per-stage configs (Triton align, combine kernel;
    stages with different N tiles) and the stream table's decode tiles (BLOCK_M 64 over ~5 rows per expert,
    K tiles past the hidden size) give the reference (the tuned default: test_triton_moe)."""
    from meshserve.kernels import triton_moe
    from meshserve.kernels.moe_configs import GroupedGemmConfig, StageConfigs, stream_configs

    configs = {"legacy": "legacy", "explicit": StageConfigs(GroupedGemmConfig(16, 32, 32), GroupedGemmConfig(16, 16, 32)),
               "stream": stream_configs(21 * 2, 8)}[table]  # (fp32 operands: a named table would take legacy)
    x, w13, w2, weights, ids = _case(21, 8, 2, 64, 48, torch.float32, "cpu", drop=True)
    got = triton_moe.fused_experts(x, w13, w2, weights, ids, configs=configs)
    torch.testing.assert_close(got, fused_experts_ref(x, w13, w2, weights, ids), atol=1e-5, rtol=1e-5)


_COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from meshserve.kernels.moe_configs import stream_configs, tuned_configs
from meshserve.kernels.triton_moe import _grouped_gemm_kernel

def compile(kernel, sig, const, warps, stages=3):
    names = list(kernel.arg_names)
    full = {n: "i32" for n in names}
    full.update({n: t for n, t in sig.items() if n in names})
    full.update({n: "constexpr" for n in const})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in names if full[n].startswith("*")}
    src = ASTSource(kernel, full, constexprs={(names.index(n),): v for n, v in const.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

gemm = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "weights_ptr": "*fp32", "as_ptr": "*fp32",
        "bs_ptr": "*fp32", "sorted_rows_ptr": "*i32", "block_expert_ptr": "*i32", "num_padded_ptr": "*i32",
        "sb_ptr": "*bf16"}
tables = [tuned_configs(pairs, 128) for pairs in (8 * 128, 16 * 128, 64 * 128, 128 * 128)]  # each bucket
tables.append(stream_configs(1536, 64))  # the stream table's decode tiles (DeepSeek-V2-Lite at 256 tokens)
for stages in tables:  # both stages
    for gated, cfg in ((True, stages.gate_up), (False, stages.down)):
        kw = cfg.kwargs()
        warps, n_stages = kw.pop("num_warps"), kw.pop("num_stages")
        const = dict(kw, QUANT=0, BLOCK_SCALE_N=1, A_ROWS_PER_TOKEN=8 if gated else 1, GATED=gated,
                     MUL_WEIGHT=not gated, PRECISION=None, HAS_SHARED=False)
        out = compile(_grouped_gemm_kernel, gemm, const, warps, n_stages)
        assert out.metadata.shared <= 227 * 1024, (cfg, gated, out.metadata.shared)  # fits an H100/H200 SM
print("compiled")
"""


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile the kernels for the real device")
def test_tuned_gemm_configs_compile_for_sm90_and_fit_shared_memory():
    """Every tuned bucket's two launches (tl.dot, 2-3 stages of up to 128 x 256 tiles) compile and fit an
    H100/H200 SM's shared memory (40 s of compiling: slow)."""
    assert_compiles_for_sm90(_COMPILE_SM90, timeout_s=600)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [256, 2048])
@pytest.mark.parametrize("experts,top_k", [(128, 8), (64, 6)], ids=["qwen3", "v2-lite"])
def test_align_matches_torch_align_gpu(tokens, experts, top_k):
    from meshserve.kernels.moe_configs import tuned_configs

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    ids = torch.randn(tokens, experts, device="cuda", generator=gen).topk(top_k).indices.to(torch.int32)
    _assert_same_alignment(ids, experts, tuned_configs(ids.numel(), experts).gate_up.BLOCK_M)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [16, 64, 256, 2048])
@pytest.mark.parametrize("model", ["qwen3-30b-a3b", "deepseek-v2-lite"])
@pytest.mark.parametrize("table", ["tuned", "legacy", "stream"])
def test_grouped_gemm_matches_reference_at_model_shapes_gpu(tokens, model, table):
    from meshserve.kernels import triton_moe
    from tests.kernels.test_triton_moe_gemv import model_batch, model_experts

    w13, w2 = model_experts(model)
    x, weights, ids = model_batch(model, tokens, tokens)
    got = triton_moe.fused_experts(x, w13, w2, weights, ids, configs=table)
    ref = fused_experts_ref(x, w13, w2, weights, ids)
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_stream_table_changes_only_the_decode_bucket():
    """stream = tuned except at 3-24 rows per expert (V2-Lite at 32-256 decode tokens): BLOCK_M 64 there, so
    one block holds an expert's rows, with 4 stages of K 64."""
    from meshserve.kernels.moe_configs import stage_configs, tuned_configs

    for tokens in (1, 16, 512, 2048):  # <= 2 and > 24 rows per expert
        pairs = tokens * 6
        assert stage_configs("stream", pairs, 64, False, False) == tuned_configs(pairs, 64)
    for tokens in (32, 64, 256):
        cfg = stage_configs("stream", tokens * 6, 64, False, False)
        assert (cfg.gate_up.BLOCK_M, cfg.down.BLOCK_M, cfg.gate_up.BLOCK_K, cfg.gate_up.num_stages) == (64, 64, 64, 4)
    assert stage_configs("stream", 256 * 6, 64, True, False) == stage_configs("legacy", 256 * 6, 64, True, False)
