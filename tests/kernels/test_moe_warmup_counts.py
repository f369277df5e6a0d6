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
