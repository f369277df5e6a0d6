"""Start-up warm-up of the kernel variants that only eager steps of some shapes reach.

The profile run (the largest step), ModelRunner.warm_up_prefill (one fresh prompt per power-of-two length) and
the graph captures compile most of the forward's kernels. Left over, each first met inside serving (a cold
Triton cache then pays ~0.5 s in some user's step, issue 18):
  * a chunk behind cached tokens (a long prompt's later chunks, a prefix-cache hit): MLA's prefill takes its
    chunked-context variant (query offsets, log-sum-exp) and merges the pieces (triton_lse_merge);
  * a mixed step past the mixed-step graphs (--max-cudagraph-tokens) or without them (MLA's always): the
    decode kernel beside the prefill kernel, eagerly, at whatever KV split count the batch's shape and longest
    context give (the split kernel compiles apart for one split, the reduce kernel once per power of two; the
    decode graphs meet only the counts of their batch sizes at max_model_len);
  * decode-only steps run eagerly (--enforce-eager, or past the decode graphs): the batch-1 GEMVs;
  * a step whose MLA prefill context outgrows the prefill workspace (kernels/mla_prefill.py: a chunk behind
    more cached tokens than one workspace holds, or many chunks behind prefixes): the attention kernel's
    log-sum-exp variant at each query tile (BLOCK_Q 16-128), into the fp32 accumulator and into the partial
    buffer, and the LSE merge at each of its row tiles, into the accumulator (three pieces and more) and into
    the output (chunked_context_steps);
  * a step of more tokens than the warm-ups' prompts (up to 512): the MoE's grouped GEMM at its largest tile
    configs (kernels/moe.warmup_token_counts gives a token count per variant; token_count_steps);
  * a draft model (speculative decoding), which runs every step eagerly: all of the above at its shapes.
Each warm-up step writes only to cache blocks no sequence owns yet, samples nothing, and stays inside what the
scheduler can schedule (StepBounds: no position past max_model_len, whose rotary tables end there).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meshserve.engine.scheduler_output import ScheduledSequence

logger = logging.getLogger(__name__)

MIXED_PREFILL_TOKENS = 16  # the prefill chunk beside the decode row of a mixed warm-up step


@dataclass(frozen=True)
class StepBounds:
    """The scheduler's limits on a step (SchedulerConfig's), which the warm-up's larger steps respect."""

    max_model_len: int  # a sequence's length, and so its last position
    max_num_seqs: int
    max_num_batched_tokens: int


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


def context_prefill_steps(
    block_size: int, num_blocks: int, limit: int, max_len: int | None = None
) -> list[list[ScheduledSequence]]:
    """One step per power-of-two chunk length 2..limit: a chunk behind one cached block (sequences of at most
    max_len tokens)."""
    steps, q = [], 2
    while q <= limit and -(-(block_size + q) // block_size) <= num_blocks:
        if max_len is not None and block_size + q > max_len:
            break
        steps.append([_seq("warmup-ctx", q, block_size, 0, block_size)])
        q *= 2
    return steps


def fresh_prefill_steps(
    block_size: int, num_blocks: int, limit: int, max_len: int | None = None
) -> list[list[ScheduledSequence]]:
    """One step per power-of-two prompt length 2..limit, nothing cached (ModelRunner.warm_up_prefill's steps;
    the draft model's too), of at most max_len tokens."""
    steps, q = [], 2
    while q <= limit and -(-q // block_size) <= num_blocks and (max_len is None or q <= max_len):
        steps.append([_seq("warmup-prefill", q, 0, 0, block_size)])
        q *= 2
    return steps


def _fits(step: list[ScheduledSequence], bounds: StepBounds, num_blocks: int) -> bool:
    """Whether the scheduler could make this step: its sizes within bounds, its blocks within the pool."""
    return (
        len(step) <= bounds.max_num_seqs
        and sum(s.num_new_tokens for s in step) <= bounds.max_num_batched_tokens
        and all(s.num_computed_tokens + s.num_new_tokens <= bounds.max_model_len for s in step)
        and sum(len(s.block_table) for s in step) <= num_blocks
    )


def _sequences(name: str, lengths: list[tuple[int, int]], block_size: int) -> list[ScheduledSequence]:
    """Sequences of (new tokens, cached tokens) each, on consecutive fresh block ranges from block 0."""
    step, first = [], 0
    for i, (new, cached) in enumerate(lengths):
        step.append(_seq(f"{name}-{i}", new, cached, first, block_size))
        first += len(step[-1].block_table)
    return step


def token_count_steps(
    counts: Sequence[int], block_size: int, num_blocks: int, bounds: StepBounds
) -> list[list[ScheduledSequence]]:
    """One fresh prefill step of each token count (prompts of at most max_model_len tokens, as many as it
    takes), leaving out counts the scheduler could not make."""
    steps = []
    for n in counts:
        per = bounds.max_model_len
        step = _sequences("warmup-tokens", [(min(per, n - i), 0) for i in range(0, n, per)], block_size)
        if n >= 1 and _fits(step, bounds, num_blocks):
            steps.append(step)
    return steps


def chunked_query_lens(max_tokens: int, min_query_len: int, v_dim: int, elem_size: int) -> list[int]:
    """The fewest new tokens (min_query_len..max_tokens) of a step's longest MLA prefill query that give each
    pair of tiles its kernels pick by that length: the prefill kernel's BLOCK_Q
    (triton_mla_prefill.prefill_config) and the LSE merge's BLOCK_T (triton_lse_merge.merge_tiles). 16-bit,
    128-wide values: 9, 17, 33, 65."""
    from meshserve.kernels.triton_lse_merge import merge_tiles
    from meshserve.kernels.triton_mla_prefill import prefill_config

    first: dict[tuple[int, int], int] = {}
    for q in range(min_query_len, max_tokens + 1):
        first.setdefault((prefill_config(q, elem_size)[0], merge_tiles(q, v_dim)[1]), q)
    return sorted(first.values())


def chunked_context_steps(
    block_size: int,
    num_blocks: int,
    chunk_tokens: int,
    bounds: StepBounds,
    query_lens: Sequence[int],
    min_query_len: int,
) -> list[list[ScheduledSequence]]:
    """Per query length of query_lens (chunked_query_lens), one step whose MLA prefill context (the cached +
    new tokens of its sequences with at least min_query_len new ones) spans three workspaces of chunk_tokens
    rows, or two where the bounds allow no more (none: serving cannot reach the variants either). Its first
    sequence has the query length; more sequences, of min_query_len new tokens behind their own cached
    prefixes, add context where max_model_len caps one."""
    steps = []
    for q in query_lens:
        for pieces in (3, 2):
            need = (pieces - 1) * chunk_tokens + 1  # context rows
            lengths, ctx = [], 0
            while ctx < need and len(lengths) <= bounds.max_num_seqs:
                new = q if not lengths else min_query_len
                total = max(new, min(bounds.max_model_len, need - ctx))
                lengths.append((new, total - new))
                ctx += total
            step = _sequences("warmup-chunked", lengths, block_size)
            if q <= bounds.max_model_len and _fits(step, bounds, num_blocks):
                steps.append(step)
                break
    return steps


def mla_workspace_shape(layers):
    """The WorkspaceShape of the layers' MLA prefill workspace (kernels/mla_prefill_workspace.py: one per
    runner, bound where the batched prefill runs), or None: no batched MLA prefill, nothing cut in pieces."""
    found = (getattr(layer, "prefill_workspace", None) for layer in layers)
    return next((w.shape for w in found if w is not None), None)


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


def grid_tile_steps(layers, block_size: int, num_blocks: int, max_num_seqs: int,
                    device: torch.device) -> list[list[ScheduledSequence]]:
    """A decode-only step and a mixed step (a prefill chunk beside them) with as many decode rows as the
    smallest batch whose decode attention takes the Triton backend's grid tile (kernels/triton_attention
    .decode_tile: its own compiled variants, with and without PDL), where max_num_seqs and the pool allow: built
    at start, not in a user's step."""
    found = []
    for layer in layers:
        min_seqs = getattr(getattr(layer, "backend", None), "grid_tile_min_seqs", None)
        if min_seqs is not None and hasattr(layer, "num_kv_heads"):
            cache = getattr(layer, "kv_cache", None)
            kv_fp8 = cache is not None and cache.dtype == torch.float8_e4m3fn
            found.append(min_seqs(layer.num_kv_heads, layer.head_dim, device, kv_fp8))
    rows = min((r for r in found if r), default=None)
    if rows is None or rows > max_num_seqs or 2 * rows > num_blocks:
        return []
    decode = [_seq(f"warmup-grid-{i}", 1, block_size, 2 * i, block_size) for i in range(rows)]
    prefill = _seq("warmup-grid-prefill", MIXED_PREFILL_TOKENS, 0, 2 * rows, block_size)
    if rows + 1 > max_num_seqs or 2 * rows + len(prefill.block_table) > num_blocks:
        return [decode]
    return [decode, [prefill, *decode]]


def split_counts(max_splits: int) -> list[int]:
    """Every KV split count the decode heuristic can choose: the powers of two up to max_splits."""
    counts, s = [], 1
    while s <= max_splits:
        counts.append(s)
        s *= 2
    return counts


def mixed_split_counts(layers) -> list[int]:
    """The KV split counts the warm-up runs its mixed step at (forced_decode_splits): every one the layers'
    heuristics may pick, so every reduce variant (SPLITS_PAD) is built; [0] where none picks one (the step
    runs once, as it comes)."""
    return split_counts(max_decode_splits(layers)) or [0]


@contextlib.contextmanager
def forced_decode_splits(layers, splits: int):
    """Every attention layer whose split count a heuristic picks (the Triton backend's unless a count is
    configured; an MLA layer's own on Triton) at `splits` inside the block; restored after (None: the
    heuristic)."""
    backends = {id(b): b for b in _heuristic_backends(layers)}
    try:
        for b in backends.values():
            b.decode_num_splits = splits
        yield list(backends.values())
    finally:
        for b in backends.values():
            b.decode_num_splits = None


def _heuristic_backends(layers) -> list:
    """What chooses a decode split count per batch: the layers' backends (Triton attention), or an MLA layer
    itself (it picks its decode kernel's splits), where no fixed count is configured (that compiles one
    variant) and some split is possible (max_decode_splits > 0: not the torch reference)."""
    found = (getattr(layer, "backend", layer) for layer in layers)
    return [
        b for b in found
        if b is not None and getattr(b, "decode_num_splits", 0) is None
        and getattr(b, "max_decode_splits", 0) > 0
    ]


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
    bounds: StepBounds | None = None,
    token_counts: Sequence[int] = (),
) -> int:
    """Run (fresh: the fresh prefill steps first) the context-prefill and decode-only steps, then the mixed
    step once per split count, then (with bounds) the grid tile's steps, then (with bounds; last, so a failure
    there leaves the rest warmed) a step of each of token_counts (the MoE's variants: moe_token_counts) and the
    chunked-context steps of the layers' MLA prefill workspace, through prepare (the runner's _prepare) and its
    plain forward. Returns the number of steps run."""
    t0 = time.perf_counter()
    steps = 0
    max_len = bounds.max_model_len if bounds is not None else None
    plain = fresh_prefill_steps(block_size, num_blocks, limit, max_len) if fresh else []
    plain += context_prefill_steps(block_size, num_blocks, limit, max_len)
    plain += decode_steps(block_size, num_blocks)
    for step in plain:
        forward(*prepare(step))
        steps += 1
    mixed = mixed_step(block_size, num_blocks)
    if mixed is not None:
        for splits in mixed_split_counts(layers):
            with forced_decode_splits(layers, splits) if splits else contextlib.nullcontext():
                forward(*prepare(mixed))
            steps += 1
    if bounds is not None:
        for step in grid_tile_steps(layers, block_size, num_blocks, bounds.max_num_seqs, device):
            forward(*prepare(step))
            steps += 1
    larger = _larger_steps(layers, block_size, num_blocks, bounds, token_counts) if bounds is not None else []
    for step in larger:
        forward(*prepare(step))
        steps += 1
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    logger.info("%s warmed up in %.1f s (%d steps)", what, time.perf_counter() - t0, steps)
    return steps


def _larger_steps(layers, block_size: int, num_blocks: int, bounds: StepBounds, token_counts: Sequence[int]):
    """The token-count steps, then the chunked-context steps of the layers' MLA prefill workspace (if any)."""
    steps = token_count_steps(token_counts, block_size, num_blocks, bounds)
    shape = mla_workspace_shape(layers)
    if shape is not None:
        from meshserve.layers.mla_attention import ABSORBED_MAX_QUERY_LEN

        shortest = ABSORBED_MAX_QUERY_LEN + 1  # fewer new tokens: the absorbed path's rows
        elem = torch.empty(0, dtype=shape.dtype).element_size()
        lens = chunked_query_lens(bounds.max_num_batched_tokens, shortest, shape.v_dim, elem)
        steps += chunked_context_steps(block_size, num_blocks, shape.chunk_tokens, bounds, lens, shortest)
    return steps


def moe_token_counts(model, max_tokens: int, activation_bytes: int) -> list[int]:
    """The token counts whose steps reach every Triton MoE kernel variant of the model's expert layers
    (layers/fused_moe.FusedMoE.warmup_token_counts), for steps of up to max_tokens tokens."""
    from meshserve.layers.fused_moe import FusedMoE

    counts = set()
    for module in model.modules():
        if isinstance(module, FusedMoE):
            counts.update(module.warmup_token_counts(max_tokens, activation_bytes))
    return sorted(counts)


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
