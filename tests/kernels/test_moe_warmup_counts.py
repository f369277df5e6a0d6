"""kernels/moe.warmup_token_counts: one token count per Triton MoE kernel variant (path and tile configs)
that a call of up to a full step's tokens can take, the fewest tokens of each; the start-up warm-up runs a
step of each (engine/eager_warmup.py) so no grouped GEMM tile config first compiles in serving (issue 29)."""

from __future__ import annotations

import pytest

from meshserve.kernels.moe import launch_variant, warmup_token_counts
from meshserve.kernels.moe_configs import tuned_configs


@pytest.mark.parametrize(
    "num_experts, top_k, expected",
    [(64, 6, [1, 2, 3, 22, 257, 1025]), (128, 8, [1, 2, 3, 33, 385, 1537])],
    ids=["deepseek-v2-lite", "qwen3-30b-a3b"],
)
def test_counts_of_the_real_shapes(num_experts, top_k, expected):
    counts = warmup_token_counts(8192, top_k, num_experts)
    assert counts == expected
    # every tile config tuned_configs can choose for 3 .. 8192 tokens' pairs is reached
    variants = [launch_variant(n, top_k, num_experts) for n in counts]
    grouped = {v[1] for v in variants if v[0] == "grouped"}
    assert grouped == {tuned_configs(n * top_k, num_experts) for n in range(3, 8193)}


@pytest.mark.parametrize(
    "variant",
    [{}, {"legacy": True}, {"quantized": True}, {"quantized": True, "blockwise_fp8": True},
     {"table": "stream"}, {"activation_bytes": 4}, {"route_align": "fused"},
     {"route_align": "fused", "legacy": True}],
    ids=["tuned", "legacy", "fp8", "fp8-block", "stream", "fp32", "route-align", "route-align-legacy"],
)
@pytest.mark.parametrize("num_experts, top_k, max_tokens", [(8, 3, 512), (64, 6, 2048), (4, 1, 64)])
def test_counts_are_complete_and_minimal(num_experts, top_k, max_tokens, variant):
    counts = warmup_token_counts(max_tokens, top_k, num_experts, **variant)
    reached = {launch_variant(n, top_k, num_experts, **variant): n for n in counts}
    assert len(reached) == len(counts)  # one count per variant
    for n in range(1, max_tokens + 1):
        v = launch_variant(n, top_k, num_experts, **variant)
        assert v in reached and reached[v] <= n


@pytest.mark.parametrize("num_experts, top_k, shared", [(64, 6, 2), (256, 8, 1)], ids=["v2-lite", "v3"])
@pytest.mark.parametrize("fold_tokens", [8192, 256], ids=["every-batch", "up-to-256"])
def test_folded_shared_experts_count_as_more_pairs_and_experts(num_experts, top_k, shared, fold_tokens):
    """MESHSERVE_MOE_FUSE_SHARED: past the GEMV a call of up to fold_tokens tokens launches as top_k + S pairs
    a token among E + S experts with the HAS_SHARED kernels (tiles and specialization differ from the routed
    experts' alone), larger ones without; the counts reach every variant either side of the bound."""
    counts = warmup_token_counts(8192, top_k, num_experts, shared_experts=shared, fuse_shared_tokens=fold_tokens)
    assert counts != warmup_token_counts(8192, top_k, num_experts)

    def variant(n):
        return launch_variant(n, top_k, num_experts, shared_experts=shared if n <= fold_tokens else 0)

    reached = {variant(n) for n in counts}
    assert len(reached) == len(counts)
    for n in range(1, 8193):
        assert variant(n) in reached
        if 1 < n <= fold_tokens:
            assert variant(n) == (*launch_variant(n, top_k + shared, num_experts + shared), ("shared", shared))
    assert variant(1) == ("gemv",)  # folded in the GEMV
    if fold_tokens < 8192:  # both sides of the bound: the same tiles may come with and without the shared slices
        assert variant(fold_tokens)[-1] == ("shared", shared) and variant(fold_tokens + 1)[0] == "grouped"
        assert len(variant(fold_tokens + 1)) == 2


def test_folded_calls_keep_the_chain_routing_and_align():
    """The one-launch routing + align (route_align "fused") aligns the routed pairs only: a call with the shared
    slices folded in takes the chain (its align sees the shared pairs), unfolded calls past the bound the
    fused launch again."""
    counts = warmup_token_counts(1024, 6, 64, shared_experts=2, fuse_shared_tokens=64, route_align="fused")
    for n in range(2, 1025):
        variant = launch_variant(n, 6, 64, route_align="fused", shared_experts=2 if n <= 64 else 0)
        assert ("fused" in variant) == (n > 64 and "fused" in launch_variant(n, 6, 64, route_align="fused"))
    assert any("fused" in launch_variant(n, 6, 64, route_align="fused") for n in counts if n > 64)


def test_gemv_and_pair_gemv_take_the_small_calls():
    assert launch_variant(1, 6, 64) == ("gemv",)
    assert launch_variant(1, 6, 64, quantized=True) == ("pair_gemv",)  # fp8 experts: triton_moe's GEMV
    assert launch_variant(2, 6, 64) == ("pair_gemv",)  # 12 pairs among 64 experts
    assert launch_variant(2, 6, 8)[0] == "grouped"


def test_fused_route_align_takes_the_grouped_decode_calls():
    """The one-launch routing + align: grouped calls of up to 512 tokens, at the grouped GEMM's BLOCK_M; not the
    GEMV's calls, the chain's prefill chunks, or the legacy path (torch routing)."""
    from meshserve.kernels.moe import fused_route_align_block_m

    assert launch_variant(256, 8, 128, route_align="fused") == (*launch_variant(256, 8, 128), "fused")
    assert fused_route_align_block_m(256, 8, 128, route_align="fused") == tuned_configs(2048, 128).gate_up.BLOCK_M
    assert fused_route_align_block_m(256, 6, 64, route_align="fused", table="stream") == 64
    assert fused_route_align_block_m(256, 8, 128) is None  # chain
    assert fused_route_align_block_m(1, 8, 128, route_align="fused") is None  # the GEMV
    assert fused_route_align_block_m(513, 8, 128, route_align="fused") is None  # a prefill chunk
    assert fused_route_align_block_m(256, 8, 128, route_align="fused", legacy=True) is None
