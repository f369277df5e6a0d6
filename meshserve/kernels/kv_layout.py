"""Where V lives inside an fp8 KV cache block: one rule that every cache writer and reader of a process follows.

The cache of a layer is [2, blocks, block_size, Hkv, D] (index 0 K, 1 V) whatever the layout, and K is always
stored in that order (d contiguous: the Q.K^T dot's operand wants pairs along d). By default an fp8 (e4m3)
cache stores each block's V as [Hkv, D, block_size] ("transposed"): tokens contiguous, the order the P.V dot's
operand wants pairs in; MESHSERVE_FP8_V_LAYOUT=rows keeps V in K's order, as 16-bit caches always do. sm_90
has no transposing 8-bit ldmatrix, so in rows order the decode kernel reads each V byte from shared memory on
its own (LDS.U8) and packs pairs in registers: per 128-token tile 1,027 SASS instructions a thread on 201
registers, where the transposed tile loads by cp.async and ldmatrix, 709 on 144
(tools/decode_attention_sass.py, 2026-12-04; the bf16 tile 575). On the H200 (2026-12-04, two processes each)
W2 Llama-3.1-8B with fp8 weights and KV ran 11.54 s against rows order's 11.86, W2 Qwen3-0.6B with fp8 KV 5.54
against 5.85: the default since. 16-bit caches keep rows order (ldmatrix.trans serves them).

The switch is read at each call, as the engine's other kernel switches are (kernels/triton_gemv.wide_tile):
set it before the process allocates a cache and leave it, since a cache written in one order reads wrong in
the other. Block copies (swap, offload, prefix reuse, KV transfer) move whole blocks and need no change, as
long as both ends share the rule.
"""

from __future__ import annotations

import functools
import os

import torch

from meshserve.errors import InvalidArgumentError

ENV = "MESHSERVE_FP8_V_LAYOUT"
LAYOUTS = ("rows", "transposed")


def fp8_v_transposed() -> bool:
    """Whether fp8 caches hold V transposed within each block (the default; MESHSERVE_FP8_V_LAYOUT=rows: not)."""
    return _parse(os.environ.get(ENV, ""))


@functools.cache
def _parse(raw: str) -> bool:
    value = raw.strip().lower() or "transposed"
    if value not in LAYOUTS:
        raise InvalidArgumentError(f"{ENV}={raw!r}: expected one of {', '.join(LAYOUTS)}")
    return value == "transposed"


def v_transposed(kv_cache: torch.Tensor) -> bool:
    """Whether this cache [2, blocks, block_size, Hkv, D] holds V as [Hkv, D, block_size] in each block: an fp8
    cache unless the switch says rows (transposed needs the cache contiguous: the kernels derive V's strides
    from its shape)."""
    if kv_cache.dtype != torch.float8_e4m3fn or not fp8_v_transposed():
        return False
    if not kv_cache.is_contiguous():
        raise ValueError(f"{ENV}=transposed needs a contiguous KV cache")
    return True


def to_transposed(kv_cache: torch.Tensor) -> torch.Tensor:
    """A copy of a rows-order cache with each block's V bytes rearranged into [Hkv, D, block_size] (the same
    logical K and V): how tests and benchmarks build a transposed cache from values laid out in rows order."""
    out = kv_cache.clone()
    out[1].view(torch.uint8).view(-1).copy_(kv_cache[1].view(torch.uint8).permute(0, 2, 3, 1).reshape(-1))
    return out


def v_rows(kv_cache: torch.Tensor) -> torch.Tensor:
    """V of the cache as [blocks, block_size, Hkv, D] in either layout: a view (reads and writes go through)."""
    if not v_transposed(kv_cache):
        return kv_cache[1]
    blocks, block_size, heads, dim = kv_cache.shape[1:]
    return kv_cache[1].view(blocks, heads, dim, block_size).permute(0, 3, 1, 2)
