"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed with padded inputs.

A decode step of a small model is dominated by kernel launches from Python; replaying a captured graph
issues them all at once. Inputs live in static buffers; padding rows write to no cache slot (slot -1)
and have context length 0, so they cost little and touch nothing. A pipeline stage after the first also
takes the previous stage's hidden states and residual from static buffers (received there in place), and one
before the last returns views of them (the stage copies them before its send: the next replay overwrites them).

Short-context variants: attention sizes its KV splits from meta.max_seq_len, which a graph fixes at capture
(max_model_len), so at small batch a 4,096-token graph runs 16 splits (most empty at a few hundred tokens)
plus a reduce (MLA layers likewise: MLAAttention.decode_splits). Small batch sizes are also captured with
max_seq_len = each context bound whose split count differs (decode_graph_variants); run() replays the
smallest variant that holds the step's real max context.

Sampled graphs: a decode step's tokens leave the plain graph as hidden states, and the LM head, the argmax and
their index work then run as ~6 operations launched from Python after it. At batch 1 of a small model the host
launching them (with the step's other work) takes as long as the GPU's step (W1 Qwen3-0.6B on an H200,
2026-12-02: the next graph launched ~0.15 ms after the last one ended, tools/w1_gaps.py). Batch sizes up to
sample_max_bs are also captured with the model's greedy head after the forward (sample_head: hidden -> token
ids, the LM head then the argmax), and an all-greedy decode step of exactly such a size replays that graph
instead (run_sampled). Only exact sizes: the head then sees the step's own rows, so its logits come from the
same kernels as the plain path's (a padded row count could pick another GEMM and move a near-tie).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Hashable, Sequence

import torch

from meshserve.distributed.parallel_state import get_parallel_state
from meshserve.engine import capture_guard
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.attention import Attention
from meshserve.layers.mla_attention import MLAAttention
from meshserve.layers.pipeline import IntermediateTensors, copy_stage_input

logger = logging.getLogger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (and max_num_seqs itself)."""
    sizes = [s for s in (1, 2, 4, 8) if s <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 16))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


def decode_graph_variants(sizes: Sequence[int], max_model_len: int, context_bounds: Sequence[int],
                          splits_of: Callable[[int, int], Hashable] | None) -> dict[int, list[int]]:
    """Batch size -> the context bounds to capture it for, ascending, always ending at max_model_len. A bound
    is kept only where splits_of(batch size, bound) (the attention split counts a graph would bake in)
    differs from that of the next larger kept bound: an equal one would replay the same kernels."""
    variants = {}
    for bs in sizes:
        kept = [max_model_len]
        if splits_of is not None:
            for bound in sorted((b for b in set(context_bounds) if 0 < b < max_model_len), reverse=True):
                if splits_of(bs, bound) != splits_of(bs, kept[0]):
                    kept.insert(0, bound)
        variants[bs] = kept
    return variants


def attention_split_counts(layers: Sequence, dtype: torch.dtype, device: torch.device, num_seqs: int,
                           max_seq_len: int) -> tuple[int, ...] | None:
    """The decode KV split count of every attention layer (MLA's too) for this batch shape, or None when a
    layer's backend does not say (the torch reference): then no short-context variants are captured."""
    counts = []
    for layer in layers:
        if isinstance(layer, MLAAttention):
            splits = layer.decode_splits(num_seqs, max_seq_len, dtype, device)
            if splits is None:
                return None
            counts.append(splits)
            continue
        splits = getattr(getattr(layer, "backend", None), "decode_splits", None)
        if not isinstance(layer, Attention) or splits is None:
            return None
        counts.append(splits(num_seqs, layer.num_kv_heads, layer.head_dim, dtype, max_seq_len, device))
    return tuple(counts)


def capture_graph(holder, args: tuple, fn: Callable | None = None) -> tuple[torch.cuda.CUDAGraph, object]:
    """One graph of fn(*args) (holder.forward unless given; holders: DecodeGraphs, MixedStepGraphs) and its
    output, captured into the holder's pool, which the first capture creates (captured largest first, later
    graphs reuse its memory).

    The holder's first graph is captured after an eager warm-up run (Triton JIT compiles, allocations, first-use
    state). A later one is first captured without it, refusing any Triton build inside the capture
    (capture_guard): the warm-up runs were half the capture time. If the capture needed a build (or failed
    otherwise) on any TP rank, every rank drops that graph and captures it again after its warm-up run (the
    ranks must agree: the warm-up run's collectives would wait for ranks that skip it); holder.num_warmed
    counts the graphs that took one."""
    fn = fn or holder.forward
    if holder.pool is not None and _skip_warm_ups():
        captured = None
        try:
            with capture_guard.refusing_builds():
                captured = _capture(holder, args, fn)
        except Exception as e:  # noqa: BLE001 - any failure: the plain path below, which raises if it fails too
            if not isinstance(e, capture_guard.BuildRefused):
                logger.warning("a CUDA-graph capture without its warm-up run failed (%s); warming up first", e)
        if _on_every_tp_rank(captured is not None, holder.device):
            return captured
        captured = None  # this rank's graph, if it made one, goes too (freed before the warm-up run)
        torch.cuda.synchronize(holder.device)
    fn(*args)
    torch.cuda.synchronize(holder.device)
    holder.num_warmed += 1
    return _capture(holder, args, fn)


def _skip_warm_ups() -> bool:
    return os.environ.get(capture_guard.ENV, "0") != "1" and capture_guard.available()


def _on_every_tp_rank(ok: bool, device: torch.device) -> bool:
    """Whether ok holds on every rank of this process's TP group (ok itself without one)."""
    st = get_parallel_state()
    if st.tp_size == 1 or st.tp_group is None:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=st.tp_group)
    return bool(flag.item())


def _capture(holder, args: tuple, fn: Callable) -> tuple[torch.cuda.CUDAGraph, object]:
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=holder.pool):
        out = fn(*args)
    if holder.pool is None:
        holder.pool = graph.pool()
    return graph, out


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds per replay of a captured graph, replayed back to back with no host work between replays
    (CUDA events around the run, after one untimed replay)."""
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / replays


def captured_us(fn, replays: int = 50) -> float:
    """Device microseconds per call of fn (no arguments) captured in a CUDA graph and replayed back to back:
    its Python and launch cost out of the figure, as in the engine's graph steps (tools' kernel timings). fn is
    run twice on a side stream first (compiles, allocator warm-up), as capture wants."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_ms(graph, replays) * 1e3


def release_graphs(holder) -> None:
    """Free the CUDA graphs of a holder (DecodeGraphs, MixedStepGraphs: its graphs, outputs, pool, forward and
    device) before the process group goes: graphs holding captured NCCL collectives kept the communicators'
    teardown waiting (2 x H200, NCCL all-reduce in the graphs)."""
    sampled = getattr(holder, "sampled_graphs", {})  # DecodeGraphs' graphs with the greedy head
    if holder.graphs or sampled:
        torch.cuda.synchronize(holder.device)
    for graph in (*holder.graphs.values(), *sampled.values()):
        graph.reset()
    for table in (holder.graphs, holder.outputs, sampled, getattr(holder, "sampled_outputs", {})):
        table.clear()
    holder.pool = None
    holder.forward = None  # the runner's: it holds these graphs, so this reference made a cycle
    if hasattr(holder, "sample_head"):
        holder.sample_head = None  # the runner's greedy head (a bound method): the same cycle


class DecodeGraphs:
    """Captured decode forwards for every batch size in the ladder, sharing one memory pool.

    Holds the static input buffers (ids, positions, slots, context lengths, block tables up to
    max_model_len) and one graph with its output per batch size. Promises: run() gives the eager forward's
    hidden states for any decode-only batch that can_run() accepts; the caller keeps the plain forward for
    everything else. Capture needs the KV cache bound (the graphs bake in its address).
    """

    def __init__(self, forward, max_num_seqs: int, max_model_len: int, block_size: int, device: torch.device,
                 stage_input: tuple[int, torch.dtype] | None = None, context_bounds: Sequence[int] = (),
                 splits_of: Callable[[int, int], Hashable] | None = None,
                 sample_head: Callable[[torch.Tensor], torch.Tensor] | None = None, sample_max_bs: int = 0,
                 replay: bool = True):
        """forward(input_ids, positions, meta, intermediate) is the model's; stage_input = (hidden size,
        dtype) on a pipeline stage that receives activations (None on the first stage); context_bounds and
        splits_of(batch size, max_seq_len) choose the short-context variants (decode_graph_variants);
        sample_head(hidden) -> greedy token ids, captured after the forward for batch sizes up to
        sample_max_bs (the sampled graphs; none without a head). replay=False is the plain path beside the
        graphs: run() and run_sampled() run the same forward eagerly on the same padded static buffers
        (CPU tests: padding and the greedy head never change a real row's token)."""
        self.forward = forward
        self.device = device
        self.sizes = capture_sizes(max_num_seqs)
        self.variants = decode_graph_variants(self.sizes, max_model_len, context_bounds, splits_of)
        self.max_bs = self.sizes[-1]
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int64, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int64, device=device)
        self.stage_in: IntermediateTensors | None = None
        if stage_input is not None:
            hidden_size, dtype = stage_input
            self.stage_in = IntermediateTensors(torch.zeros(n, hidden_size, dtype=dtype, device=device),
                                                torch.zeros(n, hidden_size, dtype=dtype, device=device))
        # keyed by (batch size, context bound)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor | IntermediateTensors] = {}
        self.pool = None
        self.num_warmed = 0  # graphs of the last capture() that took an eager warm-up run (capture_graph)
        self.replays = 0
        self.sample_head = sample_head
        self.sample_sizes = {s for s in self.sizes if s <= sample_max_bs} if sample_head is not None else set()
        self.sampled_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.sampled_outputs: dict[tuple[int, int], torch.Tensor] = {}
        self.sampled_replays = 0
        self.replay = replay

    def _meta(self, bs: int, context_bound: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            seq_lens=self.seq_lens[:bs],
            block_tables=self.block_tables[:bs],
            max_query_len=1,
            max_seq_len=context_bound,  # fixed at capture: kernels size their splits from it
            query_start_loc_cpu=list(range(bs + 1)),
            seq_lens_cpu=[0] * bs,
        )

    def _capture_args(self):
        """((batch size, context bound), forward arguments) of each graph, in capture order: largest first,
        so smaller graphs reuse its pool memory."""
        for bs in reversed(self.sizes):
            for bound in reversed(self.variants[bs]):
                yield (bs, bound), (self.input_ids[:bs], self.positions[:bs], self._meta(bs, bound),
                                    self._stage_in(bs))

    @torch.inference_mode()
    def warm_up(self) -> None:
        """The eager forward of each graph's inputs, as capture_graph runs first, without capturing: the
        kernels the captures will meet (engine/parallel_warmup.py compiles them ahead this way)."""
        for key, args in self._capture_args():
            if key[0] in self.sample_sizes:
                self._forward_sampled(*args)
            else:
                self.forward(*args)

    def _forward_sampled(self, *args) -> torch.Tensor:
        return self.sample_head(self.forward(*args))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture one graph per batch size and context bound, largest first, then the sampled
        graphs."""
        t0 = time.perf_counter()
        self.num_warmed = 0
        for key, args in self._capture_args():
            self.graphs[key], self.outputs[key] = capture_graph(self, args)
        for key, args in self._capture_args():
            if key[0] in self.sample_sizes:
                self.sampled_graphs[key], self.sampled_outputs[key] = capture_graph(self, args, self._forward_sampled)
        torch.cuda.synchronize(self.device)
        short = {bs: bounds[:-1] for bs, bounds in self.variants.items() if len(bounds) > 1}
        logger.info("captured %d decode CUDA graphs (batch 1..%d; short-context variants %s; %d with the greedy "
                    "head, batch %s; %d after an eager warm-up run) in %.1f s", len(self.graphs), self.max_bs,
                    short or "none", len(self.sampled_graphs), sorted(self.sample_sizes) or "none", self.num_warmed,
                    time.perf_counter() - t0)

    def release(self) -> None:
        """Free the graphs before the process group goes (release_graphs)."""
        release_graphs(self)

    def _stage_in(self, bs: int) -> IntermediateTensors | None:
        if self.stage_in is None:
            return None
        return IntermediateTensors(self.stage_in.hidden[:bs], self.stage_in.residual[:bs])

    def can_run(self, meta: AttentionMetadata) -> bool:
        """Decode only, no more sequences than the largest graph, block tables within the captured width."""
        return meta.is_decode_only and meta.num_seqs <= self.max_bs and meta.block_tables.shape[1] <= self.max_blocks

    def variant(self, num_seqs: int, max_seq_len: int) -> tuple[int, int]:
        """(captured batch size, context bound) of the graph that serves this many sequences whose longest
        context (this step's, host-known) is max_seq_len: the smallest captured bound that holds it."""
        bs = next(s for s in self.sizes if s >= num_seqs)
        bounds = self.variants[bs]
        return bs, next((b for b in bounds if b >= max_seq_len), bounds[-1])

    def greedy_step_graph(self, num_seqs: int, max_seq_len: int) -> torch.cuda.CUDAGraph | None:
        """The captured graph an all-greedy decode step of this shape replays (bench latency times W1's): the
        sampled one where captured, else the plain one; None before capture."""
        key = self.variant(num_seqs, max_seq_len)
        return self.sampled_graphs.get(key) or self.graphs.get(key)

    def can_sample(self, meta: AttentionMetadata) -> bool:
        """A sampled graph serves this decode-only batch: one was captured for exactly its size (and the
        variant its context takes)."""
        return (meta.num_seqs in self.sample_sizes and self.can_run(meta)
                and (not self.replay or self.variant(meta.num_seqs, meta.max_seq_len) in self.sampled_graphs))

    def run_sampled(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The greedy token ids of a batch can_sample accepts: the inputs copied in as run() does, then the
        sampled graph replayed. A view of the graph's output, which its next replay overwrites (in stream
        order: the next step reads it before)."""
        key = self._load(input_ids, positions, meta, None)
        self.sampled_replays += 1
        return self._replay(key, sampled=True)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
            intermediate: IntermediateTensors | None = None):
        """Copy the batch (and a stage's received activations, unless received in place) into the static
        buffers, padding to the next captured size, and replay. Returns views of the graph's output, which
        its next replay overwrites: a pipeline stage copies them before sending (engine/pipeline_stage.py)."""
        n = meta.num_seqs
        key = self._load(input_ids, positions, meta, intermediate)
        self.replays += 1
        out = self._replay(key, sampled=False)
        if isinstance(out, IntermediateTensors):
            return IntermediateTensors(out.hidden[:n], out.residual[:n])
        return out[:n]

    def _replay(self, key: tuple[int, int], sampled: bool):
        """The graph of key (a sampled one: its token ids) replayed, or with replay=False its forward run
        eagerly on the static buffers, the host lists of the metadata read back from them."""
        if not self.replay:
            bs, bound = key
            meta = dataclasses.replace(self._meta(bs, bound), seq_lens_cpu=self.seq_lens[:bs].tolist())
            args = (self.input_ids[:bs], self.positions[:bs], meta, self._stage_in(bs))
            return self._forward_sampled(*args) if sampled else self.forward(*args)
        graphs, outputs = (self.sampled_graphs, self.sampled_outputs) if sampled else (self.graphs, self.outputs)
        graphs[key].replay()
        return outputs[key]

    def _load(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
              intermediate: IntermediateTensors | None) -> tuple[int, int]:
        """The batch into the static buffers, padded to the captured size; returns the graph's key."""
        n = meta.num_seqs
        bs, bound = self.variant(n, meta.max_seq_len)
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        w = meta.block_tables.shape[1]
        self.block_tables[:n, :w].copy_(meta.block_tables, non_blocking=True)
        if bs > n:  # padding rows: no cache write, empty context
            self.slot_mapping[n:bs].fill_(-1)
            self.seq_lens[n:bs].fill_(0)
        if intermediate is not None:
            copy_stage_input(self.stage_in, intermediate)
        return bs, bound
