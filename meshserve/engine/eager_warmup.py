"""Start-up warm-up of the kernel variants that only eager steps of some shapes reach.

The profile run (the largest step), ModelRunner.warm_up_prefill (one fresh prompt per power-of-two length) and
the graph captures compile most of the forward's kernels. Left over, each first met inside serving (a cold
Triton cache then pays ~0.5 s in some user's step, issue 18):
  * a chunk behind cached tokens (a long prompt's later chunks, a prefix-cache hit): MLA's prefill takes its
    chunked-context variant (query offsets, log-sum-exp) and merges the pieces (triton_lse_merge);
  * a mixed step past the mixed-step graphs (--max-cudagraph-tokens) or without them: the decode kernel beside
    the unified prefill kernel, eagerly, at whatever KV split count the batch's shape gives (the split kernel
    compiles apart for one split, the reduce kernel once per power of two);
  * decode-only steps run eagerly (--enforce-eager, or past the decode graphs): the batch-1 GEMVs;
  * a draft model (speculative decoding), which runs every step eagerly: all of the above at its shapes.
Each warm-up step writes only to cache blocks no sequence owns yet and samples nothing.
"""

from __future__ import annotations

import contextlib
import logging
import time

import torch

from meshserve.engine.scheduler_output import ScheduledSequence

logger = logging.getLogger(__name__)

MIXED_PREFILL_TOKENS = 16  # the prefill chunk beside the decode row of a mixed warm-up step


def _seq(name: str, new_tokens: int, cached: int, first_block: int, block_size: int) -> ScheduledSequence:
    """A sequence with `cached` tokens already in its blocks and `new_tokens` to run, its block table a fresh
    range from first_block."""
    blocks = -(-(cached + new_tokens) // block_size)
    return ScheduledSequence(
        seq_id=name,
        token_ids=[0] * new_tokens,
        num_computed_tokens=cached,
        block_table=list(range(first_block, first_block + blocks)),
        params=None,
        do_sample=False,
    )


def context_prefill_steps(block_size: int, num_blocks: int, limit: int) -> list[list[ScheduledSequence]]:
    """One step per power-of-two chunk length 2..limit: a chunk behind one cached block."""
    steps, q = [], 2
    while q <= limit and -(-(block_size + q) // block_size) <= num_blocks:
        steps.append([_seq("warmup-ctx", q, block_size, 0, block_size)])
        q *= 2
    return steps


def fresh_prefill_steps(block_size: int, num_blocks: int, limit: int) -> list[list[ScheduledSequence]]:
    """One step per power-of-two prompt length 2..limit, nothing cached (ModelRunner.warm_up_prefill's steps;
    the draft model's too)."""
    steps, q = [], 2
    while q <= limit and -(-q // block_size) <= num_blocks:
        steps.append([_seq("warmup-prefill", q, 0, 0, block_size)])
        q *= 2
    return steps


def decode_steps(block_size: int, num_blocks: int) -> list[list[ScheduledSequence]]:
    """Decode-only steps of one row (the batch-1 GEMVs) and of two, each row behind one cached block."""
    steps = []
    for rows in (1, 2):
        if 2 * rows > num_blocks:
            break
        steps.append([_seq(f"warmup-decode-{i}", 1, block_size, 2 * i, block_size) for i in range(rows)])
    return steps


def mixed_step(block_size: int, num_blocks: int) -> list[ScheduledSequence] | None:
    """A prefill chunk beside one decode row (two cached blocks behind it), or None if the pool is too small."""
    prefill = _seq("warmup-prefill", MIXED_PREFILL_TOKENS, 0, 0, block_size)
    decode = _seq("warmup-decode", 1, 2 * block_size, len(prefill.block_table), block_size)
    if len(prefill.block_table) + len(decode.block_table) > num_blocks:
        return None
    return [prefill, decode]


def split_counts(max_splits: int) -> list[int]:
    """Every KV split count the decode heuristic can choose: the powers of two up to max_splits."""
    counts, s = [], 1
    while s <= max_splits:
        counts.append(s)
        s *= 2
    return counts


@contextlib.contextmanager
def forced_decode_splits(layers, splits: int):
    """Every attention layer whose backend picks its split count by the heuristic (the Triton one, unless a
    count is configured) at `splits` inside the block; restored after (None: the heuristic)."""
    backends = {id(b): b for b in _heuristic_backends(layers)}
    try:
        for b in backends.values():
            b.decode_num_splits = splits
        yield list(backends.values())
    finally:
        for b in backends.values():
            b.decode_num_splits = None


def _heuristic_backends(layers) -> list:
    """The layers' backends that choose a decode split count per batch (a fixed count compiles one variant)."""
    found = (getattr(layer, "backend", None) for layer in layers)
    return [b for b in found if b is not None and getattr(b, "decode_num_splits", 0) is None]


def max_decode_splits(layers) -> int:
    """The largest split count any layer's backend may choose (0: no layer splits by a heuristic)."""
    return max((b.max_decode_splits for b in _heuristic_backends(layers)), default=0)


@torch.inference_mode()
def warm_up_eager_steps(
    prepare,
    forward,
    layers,
    block_size: int,
    num_blocks: int,
    limit: int,
    device: torch.device,
    fresh: bool = False,
    what: str = "eager step variants",
) -> int:
    """Run (fresh: the fresh prefill steps first) the context-prefill and decode-only steps, then the mixed step
    once per split count, through prepare (the runner's _prepare) and its plain forward. Returns the number of
    steps run."""
    t0 = time.perf_counter()
    steps = 0
    plain = fresh_prefill_steps(block_size, num_blocks, limit) if fresh else []
    plain += context_prefill_steps(block_size, num_blocks, limit) + decode_steps(block_size, num_blocks)
    for step in plain:
        forward(*prepare(step))
        steps += 1
    mixed = mixed_step(block_size, num_blocks)
    if mixed is not None:
        for splits in split_counts(max_decode_splits(layers)) or [0]:
            with forced_decode_splits(layers, splits) if splits else contextlib.nullcontext():
                forward(*prepare(mixed))
            steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info("%s warmed up in %.1f s (%d steps)", what, time.perf_counter() - t0, steps)
    return steps


def warm_up_draft_model(drafter, block_size: int, num_blocks: int, limit: int, device: torch.device) -> int:
    """The draft model of speculative decoding runs every step eagerly (spec_decode/draft_model.py): its kernels,
    at its own shapes, meet no profile run, prefill warm-up or graph capture. The same steps on its own pool
    and input builder, fresh prefills included, then its argmax over one row of logits and over two."""
    from meshserve.distributed.parallel_state import tensor_parallel_forward

    def prepare(step):
        return drafter.inputs.build(step, 0, None, {})

    def forward(input_ids, positions, meta):
        with tensor_parallel_forward():
            return drafter.model(input_ids, positions, meta, None)

    layers = drafter.model.attention_layers()
    n = warm_up_eager_steps(
        prepare, forward, layers, block_size, num_blocks, limit, device, fresh=True, what="draft model steps"
    )
    hidden_size = drafter.config.model_config.hf_config.hidden_size
    dtype = next(drafter.model.parameters()).dtype
    for rows in (1, 2):
        drafter.model.compute_logits(torch.zeros(rows, hidden_size, dtype=dtype, device=device)).argmax(
            dim=-1
        )
    return n
