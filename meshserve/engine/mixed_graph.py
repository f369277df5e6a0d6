"""CUDA graphs for mixed steps (prefill chunks beside decode rows): one graph per token bucket, replayed padded.

Under serving load most steps mix prefill chunks with decode rows. Run eagerly they pay every kernel launch
from Python: a 276-token, 53-sequence step of an 8B model took 15.4 ms eagerly on an H200 and 9.9 ms
replayed (tools/mixed_graph_bench.py; the eager forward's host launches alone take 14-18 ms). This module captures the whole model forward for a ladder of token counts T, each graph with
S = min(T, max_num_seqs) sequence slots, all in one memory pool (the decode graphs' pool when given).

Padding, which never reaches a real row:
  sequences past the real ones  q_len 0 (query_start_loc repeats its last value) and seq_len 0
  tokens past the real total    in no sequence, cache slot -1 (no write), position 0, token id 0
Every op but attention works row by row (linears, norms, rotary, MoE routing and experts per token, the TP
all-reduce elementwise), and attention reads only the cache and each sequence's own query rows, so padded
rows only cost their share of the matmuls; run() cuts them off.

The metadata baked into a graph has max_query_len = T, max_seq_len = max_model_len and graph_bound=True:
the attention backend must size its launch from those and the shapes alone and read lengths on the device.
The Triton backend serves it with triton_unified_attention (a persistent kernel over a work list it builds on
the device once per step, inside the graph; or the grid (cdiv(T, BLOCK_Q) + S, kv heads)) for the
multi-token rows and the split-K decode kernel for the one-token rows (TritonAttentionBackend.attend).

What runs where is decided by mixed_graphs_unsupported (the reason is logged): Triton attention only (the
torch reference syncs on host lists), no MLA (its mixed path splits the batch on host lists). MoE models are
in: the fused MoE kernels keep static shapes (the decode graphs capture them already); padded tokens are
routed and computed like real ones, which wastes a little work and adds them to the expert-load counts, as
decode-graph padding rows already do.

The plain path beside the graphs: replay=False runs the same forward eagerly on the same padded buffers and
padded metadata (its host lists read back from the buffers), so CPU tests check with the torch reference
that padding never changes a real row.

Speculative decoding's verify steps replay these graphs too: a verify step is a mixed-like batch (each
verifying row brings k + 1 query tokens, the last verified token and its k proposals, beside one-token rows
and prefill chunks), so it is never decode-only (DecodeGraphs.can_run refuses it) and takes the bucket that
holds its tokens. The step sampler scores every position of those rows from the step's own (unpadded)
query_start_loc, and run() returns exactly the real rows, so the rejection sampler never sees padding. The
draft model's forwards (spec_decode/draft_model.py) still run eagerly.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Callable

import torch

from meshserve.config import EngineConfig
from meshserve.engine.cuda_graph import capture_graph, release_graphs
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.pipeline import IntermediateTensors, copy_stage_input

logger = logging.getLogger(__name__)

MIN_BUCKET = 16  # Triton specialises integer arguments on divisibility by 16: multiples keep one variant


def token_buckets(max_tokens: int, max_num_batched_tokens: int) -> list[int]:
    """Token counts captured, up to min(max_tokens, max_num_batched_tokens) (which is always one of them).

    Multiples of 16: every 16 up to 256, then eight per doubling (288 ... 512 by 32, 576 ... 1024 by 64, and
    so on): under 16 tokens of padding up to 256, and from 128 tokens on within 12.5%. An 8B model is
    compute-bound from a few hundred tokens up, where a padded token costs as much as a real one (a
    power-of-two ladder would pad a 276-token step to 512 and nearly double its matmuls).
    """
    cap = min(max_tokens, max_num_batched_tokens)
    if cap <= 0:
        return []
    sizes, t = [], MIN_BUCKET
    while t < cap:
        sizes.append(t)
        t += max(MIN_BUCKET, (1 << (t.bit_length() - 1)) // 8)
    sizes.append(cap)
    return sizes


# MESHSERVE_SPEC_VERIFY_BUCKET=1: one more bucket of exactly k + 1 tokens (speculative decoding, k + 1 < 16),
# so a batch-1 verify step replays a graph of its own size instead of the 16-token one (k = 4: 5 rows through
# every linear and 5 sequence slots instead of 16 of each). Off by default until the H200 shows it pays:
# cuBLAS took 3.77 vs 3.84 ms for the 8B's linears at 5 vs 16 rows (issue 22), and the odd size compiles its
# own Triton variants at capture.
SPEC_VERIFY_BUCKET_ENV = "MESHSERVE_SPEC_VERIFY_BUCKET"


def verify_bucket(num_speculative_tokens: int | None, buckets: list[int]) -> list[int]:
    """The buckets with the batch-1 verify step's own size added in front, when the switch is on and it is
    smaller than the smallest (else the buckets as they are)."""
    tokens = (num_speculative_tokens or 0) + 1
    if (os.environ.get(SPEC_VERIFY_BUCKET_ENV, "0") != "1" or num_speculative_tokens is None or not buckets
            or tokens >= buckets[0]):
        return buckets
    return [tokens, *buckets]


def mixed_graphs_unsupported(config: EngineConfig, attention_backend: str) -> str | None:
    """Why this runner's mixed steps must run eagerly, or None when they may replay graphs."""
    if config.enforce_eager or config.max_cudagraph_tokens == 0:
        return "turned off (enforce_eager or max_cudagraph_tokens 0)"
    if attention_backend != "triton":
        return f"the {attention_backend} attention backend reads host lists of the batch (Triton only)"
    if getattr(config.model_config.hf_config, "kv_lora_rank", None):
        return "MLA splits mixed batches into decode and prefill parts on host lists"
    return None


def graph_pool_reserve_bytes(activation_bytes: int, config: EngineConfig) -> int:
    """Memory to leave outside the KV pool for the mixed graphs' private pool: the profiled activations of a
    largest step (max_num_batched_tokens), scaled to the largest bucket (activations grow with the tokens;
    the profile's logits make this an overestimate). The eager allocator cannot reuse a graph pool."""
    sc = config.scheduler_config
    buckets = token_buckets(config.max_cudagraph_tokens, sc.max_num_batched_tokens)
    if not buckets or config.enforce_eager:
        return 0
    return int(max(0, activation_bytes) * buckets[-1] / sc.max_num_batched_tokens)


class MixedStepGraphs:
    """Captured model forwards for every token bucket, padded batches replayed through static buffers.

    Holds the static inputs (ids, positions, slots for the largest bucket; query_start_loc, seq_lens and
    block tables up to max_model_len for its sequence slots), one graph and its output per bucket, and a
    count of runs per bucket. Promises: run() gives the eager forward's hidden states for the real rows of
    any step that can_run() accepts; the caller keeps the plain forward for the rest. Capture needs the KV
    cache bound (the graphs bake in its address).
    """

    def __init__(
        self,
        forward: Callable,
        buckets: list[int],
        max_num_seqs: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        stage_input: tuple[int, torch.dtype] | None = None,
        replay: bool = True,
    ):
        """forward(input_ids, positions, meta, intermediate) is the model's; stage_input = (hidden size,
        dtype) on a pipeline stage that receives activations; replay=False: run the forward eagerly on the
        padded buffers instead of replaying (no capture; any device)."""
        if not buckets:
            raise ValueError("MixedStepGraphs needs at least one token bucket")
        self.forward = forward
        self.device = device
        self.replay = replay
        self.buckets = list(buckets)
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        t, s = self.buckets[-1], self.num_seq_slots(self.buckets[-1])
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(s, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(s, self.max_blocks, dtype=torch.int64, device=device)
        self.stage_in: IntermediateTensors | None = None
        if stage_input is not None:
            hidden_size, dtype = stage_input
            self.stage_in = IntermediateTensors(
                torch.zeros(t, hidden_size, dtype=dtype, device=device),
                torch.zeros(t, hidden_size, dtype=dtype, device=device),
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor | IntermediateTensors] = {}
        self.pool = None
        self.num_warmed = 0  # graphs of the last capture() that took an eager warm-up run (capture_graph)
        self.runs: Counter[int] = Counter()  # steps served per bucket
        self.padded_runs = 0  # of those, steps with padding tokens or sequence slots

    def num_seq_slots(self, tokens: int) -> int:
        """Sequence slots of a bucket: each sequence brings at least one token, and the scheduler at most
        max_num_seqs of them."""
        return min(tokens, self.max_num_seqs)

    def bucket_for(self, num_tokens: int, num_seqs: int) -> int | None:
        """The smallest bucket holding this many tokens and sequences (None if none does)."""
        return next((t for t in self.buckets if t >= num_tokens and self.num_seq_slots(t) >= num_seqs), None)

    def can_run(self, num_tokens: int, meta: AttentionMetadata) -> bool:
        """A bucket holds the step, and its block tables fit the captured width."""
        return (
            self.bucket_for(num_tokens, meta.num_seqs) is not None
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def _meta(self, tokens: int, qsl_cpu: list[int] | None = None, seq_lens_cpu: list[int] | None = None):
        s = self.num_seq_slots(tokens)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens],
            query_start_loc=self.query_start_loc[: s + 1],
            seq_lens=self.seq_lens[:s],
            block_tables=self.block_tables[:s],
            max_query_len=tokens,  # the bucket, not the step: fixed at capture like max_seq_len
            max_seq_len=self.max_model_len,
            # a graph's kernels never read these; the eager run hands the padded batch's real ones
            query_start_loc_cpu=qsl_cpu if qsl_cpu is not None else [0] * (s + 1),
            seq_lens_cpu=seq_lens_cpu if seq_lens_cpu is not None else [0] * s,
            graph_bound=True,
        )

    def _args(self, tokens: int, meta: AttentionMetadata):
        stage_in = None
        if self.stage_in is not None:
            stage_in = IntermediateTensors(self.stage_in.hidden[:tokens], self.stage_in.residual[:tokens])
        return self.input_ids[:tokens], self.positions[:tokens], meta, stage_in

    def _capture_args(self):
        """(bucket, forward arguments) of each graph, in capture order: largest first."""
        # all padding: no sequence, every slot -1, so warm-up and capture write no cache block
        self.slot_mapping.fill_(-1)
        self.query_start_loc.zero_()
        self.seq_lens.zero_()
        for tokens in reversed(self.buckets):
            yield tokens, self._args(tokens, self._meta(tokens))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """The eager forward of each bucket's inputs, as capture_graph runs first, without capturing (the
        kernels the captures will meet: engine/parallel_warmup.py)."""
        for _, args in self._capture_args():
            self.forward(*args)

    @torch.inference_mode()
    def capture(self, pool=None) -> None:
        """Warm up (Triton JIT compiles, cuBLAS plans) and capture one graph per bucket, largest first so
        the smaller ones reuse its pool memory. pool: a graph pool to share (the decode graphs')."""
        if not self.replay:
            raise RuntimeError("MixedStepGraphs(replay=False) runs eagerly and captures nothing")
        t0 = time.perf_counter()
        self.pool, self.num_warmed = pool, 0
        for tokens, args in self._capture_args():
            self.graphs[tokens], self.outputs[tokens] = capture_graph(self, args)
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d mixed-step CUDA graphs (%d..%d tokens; %d after an eager warm-up run) in %.1f s",
            len(self.buckets),
            self.buckets[0],
            self.buckets[-1],
            self.num_warmed,
            time.perf_counter() - t0,
        )

    def release(self) -> None:
        """Free the graphs before the process group goes (cuda_graph.release_graphs)."""
        release_graphs(self)

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        intermediate: IntermediateTensors | None = None,
    ):
        """Copy the step (and a stage's received activations) into the static buffers, pad to its bucket,
        replay (or run eagerly), and return the real rows. The rows are views of the graph's output, which
        its next replay overwrites: a caller that keeps them past that copies them (the runner does before a
        pipeline send)."""
        n, b = input_ids.shape[0], meta.num_seqs
        tokens = self.bucket_for(n, b)
        s = self.num_seq_slots(tokens)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.query_start_loc[: b + 1].copy_(meta.query_start_loc, non_blocking=True)
        self.seq_lens[:b].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(meta.block_tables, non_blocking=True)
        if tokens > n:  # tokens in no sequence: token 0 at position 0, no cache write
            self.input_ids[n:tokens].zero_()
            self.positions[n:tokens].zero_()
            self.slot_mapping[n:tokens].fill_(-1)
        if s > b:  # empty sequences: q_len 0 after the last real one, no context
            self.query_start_loc[b + 1 : s + 1].fill_(n)
            self.seq_lens[b:s].zero_()
        if intermediate is not None:  # unless received in place (engine/pipeline_stage.py)
            copy_stage_input(self.stage_in, intermediate)
        self.runs[tokens] += 1
        self.padded_runs += tokens > n or s > b
        if self.replay:
            self.graphs[tokens].replay()
            out = self.outputs[tokens]
        else:
            # the host lists read back from the buffers: the reference attention sees what a graph would
            padded = self._meta(tokens, self.query_start_loc[: s + 1].tolist(), self.seq_lens[:s].tolist())
            out = self.forward(*self._args(tokens, padded))
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden[:n], out.residual[:n])
        return out[:n]
