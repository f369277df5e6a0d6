"""Which MLA decode kernel, and which tile, serves a decode batch by default: a rule on host-known shapes only
(the number of query rows), so a CUDA graph captured for a batch size always replays the kernel it baked in.

From the H200 sweep of 2026-12-01 (tools/bench_mla_decode.py, DeepSeek-V2-Lite: 16 heads, latent 512 + rope
64, bf16; benchmarks/results/h200_1201_s11/moe_mla), per layer, the kernel alone:
  batch 1 x 800      split kernel (triton_mla) 13.2 us; balanced 15.5 (its merge walks the pieces one by one)
  batch 64 x 800     split 43.0 (39.5 with 4 warps); balanced with (32, 4, 2) 39.4
  batch 96 x 800     split 65.5 (59.5 with 4 warps); balanced (32, 4, 2) 52.6
  batch 256 x 800    split 154.9 (102.6 with 4 warps); balanced (32, 4, 2) 101.2
  batch 256 x W2mix  split 307.5 (1.03 TB/s of latents); balanced (32, 4, 2) 141.7 (2.24 TB/s): W2's contexts
                     (100-2,048 tokens) leave the split kernel's SMs waiting on the longest sequences
So: the balanced kernel (triton_mla_balanced) from BALANCED_MIN_SEQS rows on, with BALANCED_WARPS warps and
BALANCED_STAGES stages; the split kernel below (its tile: triton_mla._decode_config, 4 warps once its grid
fills the SMs). MESHSERVE_MLA_BALANCED=1 / =0 forces one kernel for A/B runs; MESHSERVE_MLA_DECODE_TILE a tile.

The tile loop both kernels run (DECODE_KERNELS, MESHSERVE_MLA_DECODE_KERNEL): "default" the plain loop (one
latent buffer: the copy of a tile waits for the previous tile's dots), "pipelined" the loop with the block ids
a tile ahead (kernels/triton_mla_pipelined.py: num_stages - 1 tiles in flight per program; the balanced kernel
then launches as many programs as fit on an SM), "auto" (the default) the pipelined loop where the balanced
kernel serves and the plain loop in the split kernel. H200, 2026-12-02 (tools/bench_mla_decode.py, the kernel
alone, tile (32, 4, 3)): balanced at batch 96 x 800 50.8 -> 43.1 us, 256 x 800 100.5 -> 82.0, 256 x W2mix
141.3 -> 114.9 (2.25 -> 2.77 TB/s); the split kernel's pipelined loop won at 16-64 rows too (14.5-31.0 us
against 16.4-39.1) but with tiles of its own, and batch 1 (W1) was not measured, so it stays opt-in there.
"""

from __future__ import annotations

BALANCED_MIN_SEQS = 64
BALANCED_WARPS = 4  # 8 warps split a [16, 32] score tile over more warps than it has mma columns
BALANCED_STAGES = 2
DECODE_KERNELS = ("auto", "default", "pipelined")


def use_pipelined(kernel: str, balanced: bool) -> bool:
    """Whether a decode launch runs the pipelined tile loop: forced by "pipelined" / "default", else (auto)
    in the balanced kernel only."""
    return kernel == "pipelined" or (kernel == "auto" and balanced)


def use_balanced(num_rows: int, forced: bool | None) -> bool:
    """Whether the balanced kernel serves a decode launch of num_rows query rows (one per sequence, padded to
    the captured batch size under a graph); forced: the selection's override (None: by shape)."""
    if forced is not None:
        return forced
    return num_rows >= BALANCED_MIN_SEQS
