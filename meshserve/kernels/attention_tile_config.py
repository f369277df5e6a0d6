"""Launch parameters of the causal prefill and unified attention kernels, and the variants the bench compares.

Every config computes the same attention (the interpreter tests check each variant against the reference);
they differ only in speed. The default below was reasoned first, then timed on an H200 (2026-12-01,
tools/bench_prefill_attention.py, benchmarks/results/h200_1201_s13): 2.1-2.3x the grid launch with every tile
masked on issue 18's mixed-step shapes and within 0-7% of the best variant on each; an 8K eager prefill 1.39x.
In a whole W3 step (1,014 prompt + 254 decode tokens) the prompt rows' attention went 3.26 -> 1.41 ms. Why:

* 128 rows (BLOCK_Q tokens x the padded GQA group) x 8 warps: two warpgroups of 64 rows, the smallest M that
  keeps Hopper's wgmma busy; 64 rows would leave each of 2 warpgroups 32 (or need 4 warps). sm_90 cubins of
  the 8B tile (Triton 3.9's ptxas): 222 registers, no spill, 97 KiB smem at BLOCK_N 64 / 3 stages; BLOCK_N 128
  reaches 255 registers and 8 B of stack (161 KiB smem); 128 rows on 4 warps spill hard (432 B of stack).
* BLOCK_N 64 in mixed steps (prompts of a few hundred tokens: short KV walks, a 128-key diagonal tile would
  waste more and the larger tile spills sooner), 128 for long eager prefills (Triton's Hopper
  fused-attention tutorial: half the online-softmax rescales per FLOP).
* 3 stages: two K/V tiles in flight hide the paged gather's latency; 128 keys x 3 stages nearly fill smem.
* diag_mask_only: only the KV tiles crossing the causal diagonal (or the window edge) build and apply a mask,
  the others skip the compare/select on every score and the load predicates.
* persistent (unified only): one program per SM walks a device-built work list, heaviest tiles first, instead
  of a grid of cdiv(T, BLOCK_Q) + S programs of which, in a step of 254 decode rows and one prompt, ~90% exit
  at once (each still costs a CTA launch, a binary search of dependent loads and, at one CTA per SM, a whole SM).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AttentionTileConfig:
    """Tiling of one causal query tile: rows = block_q * group_pad (at least 16, tl.dot), block_n KV tokens
    per inner step, num_warps / num_stages of the launch, diag_mask_only (mask only the tiles crossing the
    diagonal or the window edge), persistent (the unified kernel: programs_per_sm programs per SM walking a
    work list, else the grid of cdiv(T, BLOCK_Q) + S programs)."""

    block_q: int
    block_n: int
    num_warps: int = 8
    num_stages: int = 3
    diag_mask_only: bool = True
    persistent: bool = True
    programs_per_sm: int = 1

    def name(self) -> str:
        kind = f"persist{self.programs_per_sm}" if self.persistent else "grid"
        mask = "diag" if self.diag_mask_only else "allmask"
        return f"{kind}_bq{self.block_q}_bn{self.block_n}_w{self.num_warps}_s{self.num_stages}_{mask}"


# MESHSERVE_PREFILL_TILE_LEGACY=1: the launch before the timed default (grid, every tile masked, 64 keys)
LEGACY_DEFAULT = os.environ.get("MESHSERVE_PREFILL_TILE_LEGACY", "0") not in ("", "0")


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# an eager prompt step (prefill_attention) whose longest chunk has this many tokens takes the long-prefill tile
LONG_PREFILL_TOKENS = 1024


def default_tile_config(
    head_dim_pad: int, group_pad: int, max_query_len: int, elem_size: int = 2, long_prefill: bool = False
) -> AttentionTileConfig:
    """The default tile: up to 128 rows (64 past head_dim 128), fewer query tokens for short chunks, at least
    16 rows; long_prefill (eager prompts) gets 128-key steps where the head fits. fp32 tiles take 2 stages."""
    max_rows = 128 if head_dim_pad <= 128 else 64
    block_q = max(1, max_rows // group_pad)
    block_q = min(block_q, _next_pow2(max_query_len))
    block_q = max(block_q, max(1, 16 // group_pad))
    rows = block_q * group_pad
    block_n = 64 if head_dim_pad <= 128 else 32
    if long_prefill and head_dim_pad <= 128 and elem_size == 2 and rows >= 128:
        block_n = 128
    num_warps = 8 if rows * head_dim_pad >= 128 * 128 else 4
    # MESHSERVE_PREFILL_TILE_LEGACY=1 (or one variant by name with MESHSERVE_UNIFIED_TILE) for an A/B
    if LEGACY_DEFAULT:
        return AttentionTileConfig(block_q, 64 if head_dim_pad <= 128 else 32, num_warps,
                                   2 if elem_size == 4 else 3, diag_mask_only=False, persistent=False)
    return AttentionTileConfig(block_q, block_n, num_warps, 2 if elem_size == 4 else 3)


def clamp_block_q(config: AttentionTileConfig, group_pad: int) -> AttentionTileConfig:
    """A power-of-two block_q with at least 16 rows (tl.dot's minimum)."""
    block_q = max(_next_pow2(config.block_q), max(1, 16 // group_pad))
    return config if block_q == config.block_q else replace(config, block_q=block_q)


def bench_variants(group_pad: int) -> list[AttentionTileConfig]:
    """The variants tools/bench_prefill_attention.py times: the old launch (grid, every tile masked) first,
    then the knobs one or two at a time around the default."""
    q128, q64 = max(1, 128 // group_pad), max(1, 64 // group_pad)
    return [
        AttentionTileConfig(q128, 64, 8, 3, diag_mask_only=False, persistent=False),  # before this branch
        AttentionTileConfig(q128, 64, 8, 3, diag_mask_only=True, persistent=False),
        AttentionTileConfig(q128, 64, 8, 3, diag_mask_only=False),
        AttentionTileConfig(q128, 64, 8, 3),  # the default
        AttentionTileConfig(q128, 64, 8, 2),
        AttentionTileConfig(q128, 64, 8, 4),
        AttentionTileConfig(q128, 128, 8, 2),
        AttentionTileConfig(q128, 128, 8, 3),
        AttentionTileConfig(q128, 32, 8, 3),  # (128 rows on 4 warps spill: 255 registers + 432 B of stack)
        AttentionTileConfig(q128, 32, 8, 4),
        AttentionTileConfig(q64, 64, 4, 3),
        AttentionTileConfig(q64, 64, 4, 3, programs_per_sm=2),
        AttentionTileConfig(q64, 128, 4, 3),
        AttentionTileConfig(q64, 64, 4, 4, programs_per_sm=2),
    ]


_NAME = re.compile(r"(grid|persist(\d+))_bq(\d+)_bn(\d+)_w(\d+)_s(\d+)_(diag|allmask)$")


def config_from_name(name: str) -> AttentionTileConfig:
    """The config AttentionTileConfig.name() printed (the bench's variant labels)."""
    m = _NAME.match(name)
    if m is None:
        raise ValueError(f"not a tile config name: {name!r} (e.g. persist1_bq32_bn64_w8_s3_diag)")
    kind, pps, bq, bn, w, st, mask = m.groups()
    return AttentionTileConfig(
        int(bq), int(bn), int(w), int(st), mask == "diag", kind != "grid", int(pps or 1)
    )


# the shortest KV split the decode split rule makes (triton_attention.decode_num_splits; MESHSERVE_DECODE_SPLIT_TOKENS
# for A/Bs); the decode tile's block_n bounds it from below. Here, Triton-free, for the kernel selection's default.
DECODE_SPLIT_TOKENS = 256


def env_tile_config() -> AttentionTileConfig | None:
    """MESHSERVE_UNIFIED_TILE=<name>: the unified kernel's tiling for an A/B run of a whole step
    (tools/mixed_graph_bench.py), e.g. grid_bq32_bn64_w8_s3_allmask for the launch before the persistent one."""
    name = os.environ.get("MESHSERVE_UNIFIED_TILE")
    return config_from_name(name) if name else None
