"""Runs the model for one scheduler step on one rank: the step's inputs, the forward, the sampled tokens.

The runner composes one piece per job, each in its own module, fast path beside plain path:
  step_inputs.py   batch preparation (numpy, one pinned-buffer copy)
  cuda_graph.py    decode CUDA graphs (captured once, replayed for decode-only steps)
  mixed_graph.py   mixed-step CUDA graphs (prefill chunks + decode rows, per token bucket)
  step_sampler.py  logits, sampling and the async copy of sampled ids
  kv_pool.py       KV pool sizing and allocation
and which kernels serve them is decided once, in layers/backend_selection.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import gc
import logging
import time

import torch

from meshserve.config import EngineConfig
from meshserve.distributed.parallel_state import (
    enable_fast_all_reduce,
    get_parallel_state,
    tensor_parallel_forward,
)
from meshserve.engine import startup_timeline
from meshserve.engine.cpu_threads import set_cpu_threads
from meshserve.engine.cuda_graph import DecodeGraphs, attention_split_counts
from meshserve.engine.eager_warmup import (
    StepBounds,
    fresh_prefill_steps,
    moe_token_counts,
    warm_up_draft_model,
    warm_up_eager_steps,
)
from meshserve.engine.kv_pool import KVCachePool, largest_step
from meshserve.engine.mixed_graph import (
    MixedStepGraphs,
    graph_pool_reserve_bytes,
    mixed_graphs_unsupported,
    token_buckets,
    verify_bucket,
)
from meshserve.engine.parallel_warmup import (cache_looks_cold, parallel_compile_applies, precompile,
                                              warm_up_steps)
from meshserve.engine.pipeline_stage import StageIO, TokenHandoff, handoff_lag
from meshserve.engine.runner_output import (DeferredOutput, ModelRunnerOutput, PendingOutput, StepTimer,
                                            TokenLogprobs)
from meshserve.engine.sampling_warmup import warm_up_sampling
from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from meshserve.engine.step_inputs import StepInputBuilder
from meshserve.engine.step_profiler import StepProfiler
from meshserve.engine.step_sampler import StepSampler
from meshserve.kernels import late_jit_log, pdl, process_compile_pool, triton_build_clock
from meshserve.kernels.attention_tile_config import LONG_PREFILL_TOKENS
from meshserve.kernels.parallel_compile import CompilePass
from meshserve.layers.backend_selection import TORCH_DTYPES, bind_kernels, select_kernels
from meshserve.layers.mla_attention import bind_prefill_workspace
from meshserve.layers.pipeline import IntermediateTensors
from meshserve.layers.sampler import Sampler
from meshserve.models.loader import ModelSource, build_model, weight_bytes
from meshserve.spec_decode.drafters import build_drafter

__all__ = ["ModelRunner", "ModelRunnerOutput", "PendingOutput", "TokenLogprobs"]

logger = logging.getLogger(__name__)


class ModelRunner:
    """One rank's model shard, its KV memory and its per-step state.

    Every rank of a split model holds one; the executor calls the same methods on all of them in the same
    order (by name: execute, determine_num_blocks_all, allocate_kv_cache, param_bytes). Promises: execute
    and launch run this rank's part of a step; only the sampler rank (TP rank 0 of the last stage) returns
    tokens. The KV pool must be allocated (allocate_kv_cache) before the first step.
    """

    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        mc = config.model_config
        self.device = torch.device(config.device)
        self.dtype = TORCH_DTYPES[mc.dtype]
        self.block_size = config.cache_config.block_size
        self.vocab_size = mc.vocab_size
        late_jit_log.starting()  # this engine's compiles are start-up ones until allocate_kv_cache ends
        if self.device.type == "cuda":  # the CUDA context, created here so the timeline names its cost
            torch.empty(1, device=self.device)
            triton_build_clock.install()
            startup_timeline.mark("CUDA context", sync=self.device)
        self.kernels = select_kernels(config)
        if self.kernels.parallel_compile_processes and parallel_compile_applies(
                self.kernels.parallel_compile_workers, self.device.type, config.parallel_config.world_size):
            process_compile_pool.prestart(self.kernels.parallel_compile_workers)  # they start as weights load
        if self.device.type == "cpu":  # every rank of this node shares the cores
            pc = config.parallel_config
            set_cpu_threads(max(1, pc.world_size // max(1, pc.nnodes)))
        if not config.parallel_config.disable_custom_all_reduce:
            enable_fast_all_reduce(self.device, self.dtype)
        torch.manual_seed(mc.seed)
        self.model = build_model(source, self.dtype, self.device, mc.max_model_len, seed=mc.seed,
                                 quantization=mc.quantization)
        bind_kernels(self.model, self.kernels)
        # MLA's prefill expands its context into this fixed workspace, allocated before the memory profile
        # so the profile counts it (a long cached prefix would otherwise grow the step's memory unseen)
        self.mla_workspace = bind_prefill_workspace(self.model, self.kernels,
                                                    config.scheduler_config.max_num_batched_tokens, self.dtype,
                                                    self.device)
        if self.mla_workspace is not None:
            logger.info("MLA prefill workspace: %d-token chunks, %.1f MiB", self.mla_workspace.chunk_tokens,
                        self.mla_workspace.nbytes / 2**20)
        self.kv_pool = KVCachePool(config, self.model.attention_layers(), self.kernels.kv_cache_dtype, self.device)
        # pinned host buffers (inputs, sampled ids) used in turn by consecutive steps: two for async
        # scheduling (step n+1 is prepared while step n's copies may still be queued); with pipeline
        # parallel one per step in flight and one more, since a stage's sampled ids are read by another
        # thread after later steps are launched (worker.ResultSender)
        depth = config.parallel_config.pipeline_steps_in_flight
        self.num_step_buffers = 2 if depth == 0 else depth + 1
        self.inputs = StepInputBuilder(self.block_size, self.device, self.num_step_buffers)
        pc = config.parallel_config
        # TP ranks other than 0 need the sampled ids on their device when steps are scheduled ahead
        share = pc.tensor_parallel_size > 1 and pc.pipeline_parallel_size == 1 and config.scheduler_config.async_scheduling
        self.sampling = StepSampler(self.model, Sampler(self.kernels.fused_sampler, self.kernels.greedy_argmax),
                                    self.vocab_size, self.device, share_sampled=share,
                                    num_buffers=self.num_step_buffers)
        self.graphs: DecodeGraphs | None = None
        self.mixed_graphs: MixedStepGraphs | None = None
        self.profile_compile: CompilePass | None = None  # the profile step's parallel pre-compile, if it ran
        self.layerwise_hook = None  # disagg/layer_hook.py LayerwiseHook, on a layer-wise KV producer
        # a draft model proposes on the ranks, after each step, eagerly (the verify steps themselves replay
        # the mixed-step graphs: _run_forward)
        self.drafter = build_drafter(config, self.device, self.model)  # a draft model or an EAGLE-3 head
        # a step launched while its grammar masks still fill on a thread, its sampling not queued yet (launch)
        self._deferred: tuple | None = None
        self._step_parity = 0  # which of the pinned buffers this step uses
        st = get_parallel_state()
        self.stage_io = None  # a pipeline stage's activation receives and sends (pipeline_stage.py)
        if st.pp_size > 1:
            self.stage_io = StageIO(mc.hf_config.hidden_size, self.dtype, self.device, st.is_first_stage,
                                    st.is_last_stage)
        # the last stage's sampled ids straight to the first stage (experimental; pipeline_stage.TokenHandoff)
        self.handoff_lag = handoff_lag(config.parallel_config)
        self.handoff = None
        if self.handoff_lag and (st.is_first_stage or st.is_last_stage):
            if st.handoff_group is None:  # the world was joined without it: the ids would cross the activations
                raise RuntimeError("pp_token_handoff: this rank joined the group without the hand-off's communicator")
            self.handoff = TokenHandoff(self.handoff_lag, self.device, st.handoff_group, st.stage_rank(0),
                                        st.stage_rank(st.pp_size - 1))
            self.handoff.connect(st.is_first_stage)
        self.profiler = StepProfiler(get_parallel_state().rank)

    def close(self) -> None:
        """Release the CUDA graphs (they hold the process group's communicators) and the KV caches; before
        teardown and at shutdown. Explicitly, not left to garbage collection: the graphs hold this runner's
        forward, a reference cycle only the cyclic collector frees, and a caller may still hold the LLM's
        insides; until then a dead engine's KV cache stayed allocated, and the next engine in the process
        counted it in its profiled peak (no memory left for its KV cache)."""
        if self.mixed_graphs is not None:
            self.mixed_graphs.release()
            self.mixed_graphs = None
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None
        self.kv_pool.release()
        if self.drafter is not None:
            self.drafter.kv_pool.release()
        self.kv_transfer = None  # KV offload's copy engine holds the cache tensors too

    def drain_handoff(self) -> None:
        """Before a graceful shutdown: the first stage takes the token hand-off's last sends (TokenHandoff)."""
        if self.handoff is not None and self.stage_io.is_first:
            self.handoff.drain()

    def startup_segment(self) -> startup_timeline.Segment:
        """This rank's start-up phases so far (the core gathers the worker ranks')."""
        return startup_timeline.current()

    def mixed_graph_tokens(self) -> int:
        """The largest mixed step that replays a CUDA graph here (0: mixed steps run eagerly)."""
        return self.mixed_graphs.buckets[-1] if self.mixed_graphs is not None else 0

    def param_bytes(self) -> int:
        """Bytes of this rank's weights (shared tensors once)."""
        return weight_bytes(self.model)

    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert, per MoE layer of this rank's stage (counted on this rank; [] if dense)."""
        layers = getattr(self.model, "expert_layers", None)
        return [layer.expert_load.tolist() for layer in layers()] if layers else []

    def kv_bytes_per_token(self) -> float:
        """Bytes of this rank's KV cache per token (all its layers, the draft model's too)."""
        return self._bytes_per_block() / self.block_size

    def _bytes_per_block(self) -> int:
        return self.kv_pool.bytes_per_block() + (self.drafter.bytes_per_block() if self.drafter else 0)

    # -- KV memory -------------------------------------------------------------------------------
    def kv_block_layout(self) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape of one block of every layer of this rank, [layers, 2, block_size, kv_heads, head_dim] (MLA:
        [layers, 1, block_size, 1, latent]), and its dtype: a slot of the KV offload tiers."""
        t = self.kv_pool.tensors[0]
        return (len(self.kv_pool.tensors), t.shape[0], *t.shape[2:]), t.dtype

    def attach_kv_offload(self, cpu_tier, stats, verify: bool = False) -> None:
        """Run the steps' KV offload copies between this rank's pool and cpu_tier (kv_offload/transfer.py)."""
        from meshserve.engine.kv_offload.transfer import KVTransferEngine

        self.kv_transfer = KVTransferEngine(self.kv_pool.tensors, cpu_tier, stats, verify)

    def determine_num_blocks_all(self) -> int:
        """determine_num_blocks agreed over every rank (the smallest), so all stages hold the same pool."""
        n = self.determine_num_blocks()
        st = get_parallel_state()
        if st.world_size > 1:
            t = torch.tensor([n], dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=st.cpu_group)
            n = int(t.item())
        return n

    def determine_num_blocks(self) -> int:
        """How many KV blocks the memory budget allows (or the override); a draft model's pool shares it."""
        # the budget is divided by what a block id costs in both pools; scaling the target's count down after
        # it shrank the CPU pool's cap (every sequence at full length, counted in blocks) too: with a draft
        # model and max_num_seqs 1 a 183-token prompt was refused by a 1 GiB budget (168 tokens of room)
        return self.kv_pool.determine_num_blocks(self._peak_memory_with_graphs, self._bytes_per_block())

    def _peak_memory_with_graphs(self) -> int:
        """The eager peak plus room for the mixed graphs' private pool (mixed_graph.graph_pool_reserve_bytes)."""
        peak = self.profile_peak_memory()
        if not self.kernels.cuda_graphs or mixed_graphs_unsupported(self.config, self.kernels.attention_backend):
            return peak
        return peak + graph_pool_reserve_bytes(peak - self.param_bytes(), self.config)

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak bytes of a largest-size step (weights included): max_num_batched_tokens of prefill spread
        over up to max_num_seqs sequences, plus their logits, run against a throwaway KV cache."""
        scheduled = largest_step(self.config.scheduler_config, self.block_size)
        num_blocks = sum(len(s.block_table) for s in scheduled)
        # the peak below starts from everything allocated in the process: collect what only the cyclic
        # collector frees first (an engine shut down while referenced, its graphs' cycle), so its tensors
        # are not counted as this engine's
        gc.collect()
        torch.cuda.empty_cache()
        self.kv_pool.allocate(num_blocks)
        if self._parallel_compile():  # its kernels built in parallel first (engine/parallel_warmup.py)
            self.profile_compile = precompile(lambda: self._profile_step(scheduled),
                                              self.kernels.parallel_compile_workers, "profile step",
                                              self.model, self.kernels.parallel_compile_processes)
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._profile_step(scheduled)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        self.kv_pool.release()
        torch.cuda.empty_cache()
        # the profile cache itself is not activation memory
        return peak - num_blocks * self.kv_pool.bytes_per_block()

    def _profile_step(self, scheduled: list[ScheduledSequence]) -> None:
        """The largest step's forward and its logits (stand-in activations on a later pipeline stage)."""
        input_ids, positions, meta = self._prepare(scheduled)
        st = get_parallel_state()
        intermediate = None
        if not st.is_first_stage:  # stand-in activations of the right size
            h = torch.zeros(input_ids.shape[0], self.config.model_config.hf_config.hidden_size,
                            dtype=self.dtype, device=self.device)
            intermediate = IntermediateTensors(h, h.clone())
        hidden = self.forward(input_ids, positions, meta, intermediate)
        if st.is_last_stage:
            last = meta.query_start_loc[1:].long() - 1
            self.model.compute_logits(hidden[last]).float().softmax(-1)

    def _parallel_compile(self) -> bool:
        return parallel_compile_applies(self.kernels.parallel_compile_workers, self.device.type,
                                        get_parallel_state().world_size)

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        """Allocate the pool and bind it to the layers; then (on a GPU) compile the prefill kernels and
        capture the decode and mixed-step graphs where the backend selection allows them."""
        self.kv_pool.allocate(num_blocks)
        if self.drafter is not None:
            self.drafter.allocate(num_blocks)
        if not capture_graphs:
            return
        startup_timeline.mark("KV allocated", sync=self.device)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.kv_pool.bytes_per_block() / 2**30)
        decode_graphs = mixed_graphs = None
        if self.kernels.cuda_graphs:  # built (static buffers) now, captured after the warm-ups
            sc = self.config.scheduler_config
            stage_input = self._stage_input()
            splits_of = functools.partial(attention_split_counts, self.model.attention_layers(), self.dtype,
                                          self.device)
            # the greedy head after the forward (sampled graphs) only where this rank samples alone: one stage
            # and one TP rank (StepSampler.samples_in_graph)
            st = get_parallel_state()
            head = self._greedy_head if st.pp_size == 1 and st.tp_size == 1 else None
            decode_graphs = DecodeGraphs(self.forward, sc.max_num_seqs, sc.max_model_len, self.block_size,
                                         self.device, stage_input, self.kernels.decode_context_bounds, splits_of,
                                         head, self.kernels.decode_sample_graph_max_bs)
            mixed_graphs = self.build_mixed_graphs(stage_input)
        if self._parallel_compile() and cache_looks_cold(self.profile_compile):  # their kernels built first
            holders = [g for g in (decode_graphs, mixed_graphs) if g is not None]
            precompile(warm_up_steps(self, num_blocks, holders), self.kernels.parallel_compile_workers,
                       "warm-up and capture steps", self.model, self.kernels.parallel_compile_processes)
            startup_timeline.mark("parallel pre-compile", sync=self.device)
        process_compile_pool.stop()  # the passes are done (a no-op without processes)
        if self.device.type == "cuda":
            self.warm_up_prefill(num_blocks)
            startup_timeline.mark("prefill + eager warm-ups", sync=self.device)
        if decode_graphs is not None:
            self.graphs = decode_graphs
            self.graphs.capture()
            startup_timeline.mark("decode graphs", sync=self.device)
            self.mixed_graphs = mixed_graphs
            if self.mixed_graphs is not None:
                self.mixed_graphs.capture(pool=self.graphs.pool)  # one pool for all graphs
                startup_timeline.mark("mixed graphs", sync=self.device)
        if self.device.type == "cuda" and get_parallel_state().is_last_stage:
            # the sampling paths' kernels (sampler, LM head GEMV, grammar masks) before the first request
            with _best_effort("sampling"):
                warm_up_sampling(self.model.compute_logits, self.sampling.sampler,
                                 self.config.model_config.hf_config.hidden_size, self.dtype, self.vocab_size,
                                 self.device)
            startup_timeline.mark("sampling warm-up", sync=self.device)
        if self.device.type == "cuda":
            late_jit_log.serving()  # any Triton build from here on is logged: a first-request compile

    def _greedy_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """A decode batch's greedy token ids from its hidden states, as sample() computes them for plain greedy
        rows (every row is a sampling row: its logits, then sample_rows' argmax)."""
        # a decode step's head: PDL as the step's forward takes it (one-row steps only under steps="one")
        with pdl.step_scope(True, hidden.shape[0]) if self.kernels.sample_head_pdl else pdl.plain():
            return self.sampling.sampler.argmax(self.model.compute_logits(hidden))

    def _stage_input(self) -> tuple[int, torch.dtype] | None:
        """(hidden size, dtype) of the activations this rank receives from the previous stage, or None."""
        if get_parallel_state().is_first_stage:
            return None
        return self.config.model_config.hf_config.hidden_size, self.dtype

    def use_padded_graphs(self) -> int:
        """The graphs' plain path on any device: every step a mixed-step bucket holds runs eagerly on the
        graphs' padded static buffers (replay=False), a stage's input received there in place and its output
        copied before the send, as with replayed graphs (CPU tests). Returns the largest bucket."""
        self.mixed_graphs = self.build_mixed_graphs(self._stage_input(), replay=False)
        return self.mixed_graph_tokens()

    def build_mixed_graphs(self, stage_input=None, replay: bool = True) -> MixedStepGraphs | None:
        """The mixed-step graphs this config allows (uncaptured), or None (the reason is logged). replay=False
        builds the eager-on-padded-buffers variant (CPU tests of the padding)."""
        sc = self.config.scheduler_config
        unsupported = mixed_graphs_unsupported(self.config, self.kernels.attention_backend) if replay else None
        buckets = token_buckets(self.config.max_cudagraph_tokens, sc.max_num_batched_tokens)
        spec = self.config.speculative_config
        buckets = verify_bucket(spec.num_speculative_tokens if spec is not None else None, buckets)
        if unsupported is not None or not buckets:
            logger.info("mixed prefill + decode steps run eagerly: %s", unsupported or "no bucket")
            return None
        return MixedStepGraphs(self.forward, buckets, sc.max_num_seqs, sc.max_model_len, self.block_size,
                               self.device, stage_input, replay=replay)

    @torch.inference_mode()
    def warm_up_prefill(self, num_blocks: int) -> None:
        """Compile the prefill kernels for every query-length bucket now, not on a user's first request
        (each JIT costs ~0.3 s of TTFT). Writes only to cache blocks no sequence owns yet."""
        if get_parallel_state().pp_size > 1:
            return  # stages would need their neighbours; the first real steps compile instead
        t0 = time.perf_counter()
        sc = self.config.scheduler_config
        bounds = StepBounds(sc.max_model_len, sc.max_num_seqs, sc.max_num_batched_tokens)
        limit = min(512, sc.max_num_batched_tokens)
        # fresh prompts up to the long-prefill tile's threshold too: a 2-8k prompt's first chunk would
        # otherwise build that tile in some user's TTFT (seen on the H200 in the disaggregation runs)
        fresh_limit = min(max(limit, LONG_PREFILL_TOKENS), sc.max_num_batched_tokens)
        for step in fresh_prefill_steps(self.block_size, num_blocks, fresh_limit, sc.max_model_len):
            self.forward(*self._prepare(step))
        torch.cuda.synchronize(self.device)
        logger.info("prefill kernels warmed up in %.1f s", time.perf_counter() - t0)
        # chunks behind cached tokens (MLA's past its workspace too), the MoE's tile configs up to a full step
        # and eager mixed steps at every KV split count (eager_warmup.py)
        with _best_effort("eager step"):
            counts = moe_token_counts(self.model, sc.max_num_batched_tokens, self.dtype.itemsize)
            warm_up_eager_steps(self._prepare, self.forward, self.model.attention_layers(), self.block_size,
                                num_blocks, limit, self.device, bounds=bounds, token_counts=counts)
        if self.drafter is not None:
            with _best_effort("draft model"):
                # its steps take no bounds: the long prompt only where a cached block still fits before
                # max_model_len (its context steps put the chunk behind one)
                draft_limit = min(fresh_limit, max(limit, sc.max_model_len - self.block_size))
                warm_up_draft_model(self.drafter, self.block_size, num_blocks, draft_limit, self.device)

    # -- one step --------------------------------------------------------------------------------
    def forward(self, input_ids, positions, meta, intermediate: IntermediateTensors | None = None):
        """The model's forward inside the TP all-reduce's per-forward scope (every call site, graphs too)."""
        # PDL (kernels/pdl.py) only where the step is decode-only (by default); captures and warm-ups too
        rows = positions.shape[0] if positions is not None else None  # (every stage has positions, not ids)
        with tensor_parallel_forward(), pdl.step_scope(meta.is_decode_only, rows):
            return self.model(input_ids, positions, meta, intermediate)

    def _graphs_for(self, input_ids, meta) -> DecodeGraphs | MixedStepGraphs | None:
        """The graphs that serve the step: the decode graphs for decode-only steps, the mixed-step graphs for
        other steps a bucket holds, else None (the plain forward)."""
        if self.graphs is not None and self.graphs.can_run(meta):
            return self.graphs
        layerwise = self.layerwise_hook is not None and self.layerwise_hook.active  # per-layer hooks: eager
        if self.mixed_graphs is not None and not layerwise and self.mixed_graphs.can_run(input_ids.shape[0], meta):
            return self.mixed_graphs
        return None

    def _samples_in_graph(self, out: SchedulerOutput, meta) -> bool:
        """The step replays a sampled decode graph (DecodeGraphs.run_sampled): one was captured for its batch,
        the sampler agrees (StepSampler.samples_in_graph: all rows plain greedy) and nothing hooks the forward
        or the sampling (disaggregation's per-layer sends, grammar masks, a drafter's proposals after it)."""
        graphs = self.graphs
        return (graphs is not None and bool(graphs.sample_sizes) and self.drafter is None
                and self.layerwise_hook is None and out.before_sample is None and out.grammar_bitmask is None
                and graphs.can_sample(meta) and self.sampling.samples_in_graph(out.scheduled))

    def _run_forward(self, input_ids, positions, meta, intermediate: IntermediateTensors | None = None):
        """The step's forward: replaying the graphs _graphs_for chooses, else the plain forward."""
        graphs = self._graphs_for(input_ids, meta)
        if graphs is not None:
            return graphs.run(input_ids, positions, meta, intermediate)
        return self.forward(input_ids, positions, meta, intermediate)

    def _prepare(self, scheduled: list[ScheduledSequence]):
        """Flat batch tensors (input_ids, positions, AttentionMetadata) for the step (step_inputs.py)."""
        return self.inputs.build(scheduled, self._step_parity, self.sampling.last_sampled,
                                 self.sampling.last_rows, self.sampling.last_rejected)

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run this rank's part of the step. Only the sampler rank's output carries tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingOutput | DeferredOutput:
        """Queue the step on the device and return without waiting for its sampled tokens."""
        self.finish_deferred()  # the last step's sampling first: this step's inputs read its tokens
        self.sampling.forget(out.finished_seq_ids)
        self.profiler.step()
        if out.kv_transfers:  # first, on the copy stream: the forward waits for the loads only (transfer.py)
            self.kv_transfer.run(out.kv_transfers)
        if out.is_empty:
            return PendingOutput(ModelRunnerOutput())
        self._step_parity = (self._step_parity + 1) % self.num_step_buffers
        st = get_parallel_state()
        if st.pp_size == 1:
            timer = StepTimer(self.device)
            input_ids, positions, meta = self._prepare(out.scheduled)
            if self._samples_in_graph(out, meta):  # the forward, the LM head and the argmax in one replay
                token_ids = self.graphs.run_sampled(input_ids, positions, meta)
                pending = self.sampling.sampled_in_graph(out.scheduled, token_ids, self._step_parity)
                pending.timer = timer.stop()
                self._stores_after_forward(out)
                return pending
            if self.layerwise_hook is not None:  # disaggregation: each layer's finished blocks go out as it ends
                self.layerwise_hook.begin(out.scheduled)
            hidden = self._run_forward(input_ids, positions, meta)
            if self.layerwise_hook is not None:
                self.layerwise_hook.end()
            if out.before_sample is not None:  # grammar masks, filled while the device runs the forward
                out.before_sample()
            if isinstance(out.grammar_bitmask, concurrent.futures.Future) and self.drafter is None:
                # filling on a thread: sample once the host has done what else it can (finish_deferred)
                deferred = DeferredOutput(self.finish_deferred)
                self._deferred = (deferred, out, hidden, meta, self._step_parity, timer)
                self._stores_after_forward(out)
                return deferred
            pending = self.sampling.sample(out.scheduled, hidden, meta, self._step_parity,
                                           _masks_now(out.grammar_bitmask))
            if self.drafter is not None:
                pending = self.drafter.propose_after(out.scheduled, pending)
            pending.timer = timer.stop()
            self._stores_after_forward(out)
            return pending
        pending = self._launch_stage(out.scheduled, st.is_last_stage, out.grammar_bitmask)
        self._stores_after_forward(out)
        return pending

    @torch.inference_mode()
    def finish_deferred(self) -> None:
        """Queue the sampling of the step launched with its grammar masks still filling (launch), once they
        are filled; nothing when there is none."""
        if self._deferred is None:
            return
        deferred, out, hidden, meta, parity, timer = self._deferred
        self._deferred = None
        out.grammar_bitmask = out.grammar_bitmask.result()
        pending = self.sampling.sample(out.scheduled, hidden, meta, parity, out.grammar_bitmask)
        pending.timer = timer.stop()
        deferred.target = pending

    def _stores_after_forward(self, out: SchedulerOutput) -> None:
        # KV offload's write-through of the blocks this forward fills: on the copy stream, after the forward,
        # overlapping the next steps (transfer.py); the blocks stay in flight until their stores land
        if out.kv_stores_after_forward:
            self.kv_transfer.run(out.kv_stores_after_forward)

    def _launch_stage(self, scheduled: list[ScheduledSequence], is_last_stage: bool,
                      grammar_bitmask=None) -> PendingOutput:
        """This pipeline stage's part of a step, queued without waiting for the device: receive the previous
        stage's activations (into the static buffers of the graph that serves the step), run this stage's
        layers, then send them on, or sample on the last stage (pipeline_stage.py). The engine keeps
        pipeline_depth steps in flight (EngineCore._step_pipelined), each over other sequences, so every
        stage works on some step while the host prepares the next; the device time measured is this
        stage's compute, from the activations' arrival."""
        if not self.handoff_lag:
            input_ids, positions, meta = self._prepare(scheduled)
        else:  # a pending token comes from the last stage's samples on the first; later stages embed no tokens
            ids, rows = self.handoff.receive(scheduled) if self.stage_io.is_first else (None, {})
            input_ids, positions, meta = self.inputs.build(scheduled, self._step_parity, ids, rows)
        graphs = self._graphs_for(input_ids, meta)
        intermediate = self.stage_io.receive(input_ids.shape[0], graphs)
        timer = StepTimer(self.device)  # on the compute stream after the receive: compute time only
        if graphs is not None:
            hidden = graphs.run(input_ids, positions, meta, intermediate)
        else:
            hidden = self.forward(input_ids, positions, meta, intermediate)
        if is_last_stage:
            pending = self.sampling.sample(scheduled, hidden, meta, self._step_parity,
                                           _masks_now(grammar_bitmask))
            if self.handoff is not None:
                self.handoff.send(scheduled, self.sampling.last_sampled)
        else:
            self.stage_io.send(hidden, from_graph=graphs is not None)
            pending = PendingOutput(ModelRunnerOutput())
        pending.timer = timer.stop()
        return pending

    def stage_counts(self) -> dict:
        """This pipeline stage's steps by how they ran (graph replays, eager) and its copied sends, and with the
        token hand-off the steps whose sampled ids it handed on or took (handed_steps); {} unsplit."""
        if self.stage_io is None:
            return {}
        counts = vars(self.stage_io.counts).copy()
        if self.handoff is not None:
            counts["handed_steps"] = self.handoff.num_handed
        return counts


@contextlib.contextmanager
def _best_effort(what: str):
    """A start-up warm-up only moves compiles earlier: if one fails (a bug to fix, reported with its traceback),
    the engine still serves, and those kernels compile on first use as before."""
    try:
        yield
    except Exception:
        logger.exception("%s warm-up failed; its kernels will compile on first use", what)


def _masks_now(masks):
    """A step's grammar masks, waiting for them when they are still being filled on a thread."""
    return masks.result() if isinstance(masks, concurrent.futures.Future) else masks
