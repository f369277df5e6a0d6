"""EngineCore: schedules and runs the model, step by step, in token ids only.

The loop is small on purpose (vLLM v1's shape): schedule -> execute -> update -> deltas. Text never enters
here: tokenization, detokenization, stop strings and logprob text belong to the front end
(input_processor.py, output_processor.py), which aborts a request here when a stop string ends it.
"""

from __future__ import annotations

import bisect
import collections
import concurrent.futures
import functools
import json
import logging
import os
import time

from meshserve.config import EngineArgs, EngineConfig
from meshserve.disagg.coordinator import build_kv_transfer
from meshserve.distributed import process_start
from meshserve.distributed.launch import spawns_local_ranks
from meshserve.engine import startup_timeline
from meshserve.engine.engine_config import create_engine_config
from meshserve.engine.executor import UniprocExecutor, make_executor
from meshserve.engine.expert_load import ExpertLoadReader
from meshserve.engine.grammar_probe import grammar_probe
from meshserve.engine.grammar_waitlist import GrammarWaitlist
from meshserve.engine.kv_offload.setup import build_kv_offload
from meshserve.engine.messages import (
    ITERATION_TOKENS_BUCKETS,
    CoreInfo,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestError,
    SchedulerStats,
    TokenLogprobs,
    error_to_message,
)
from meshserve.engine.model_runner import ModelRunnerOutput, PendingOutput
from meshserve.engine.pipeline_stage import handoff_lag
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import SchedulerOutput, sampling_indices
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.engine.step_profiler import phase
from meshserve.engine.step_time import DeviceRates, StepShape, StepTimeModel, step_weights
from meshserve.errors import InvalidArgumentError, ServiceLevelShedError
from meshserve.spec_decode.speculator import Speculator
from meshserve.structured.bitmask_filler import BitmaskFiller
from meshserve.structured.compiler import GrammarCompiler

logger = logging.getLogger(__name__)


def config_eos_token_ids(hf_config, model_dir: str | None) -> list[int]:
    """EOS ids from generation_config.json and the model config, merged (the front end adds the tokenizer's)."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    if model_dir:
        # the file's own field, read as JSON: transformers' GenerationConfig would cost seconds of import here
        try:
            with open(os.path.join(model_dir, "generation_config.json"), encoding="utf-8") as f:
                add(json.load(f).get("eos_token_id"))
        except (OSError, ValueError, AttributeError):  # no generation_config.json (or not a JSON object): fine
            pass
    add(getattr(hf_config, "eos_token_id", None))
    return sorted(ids)


def step_shape(sched_out: SchedulerOutput) -> StepShape:
    """What the step-time model needs of a scheduled step (the scheduler's, when it computed it)."""
    return sched_out.shape if sched_out.shape is not None else StepShape.of(sched_out.scheduled)


def spec_decode_stats(stats, num_speculative_tokens: int = 0) -> dict:
    """SchedulerStats fields of the speculative-decoding counters (accepted per position: every one of the
    num_speculative_tokens positions from the start, as vLLM's)."""
    per_pos = list(stats.num_accepted_tokens_per_pos)
    per_pos += [0] * (num_speculative_tokens - len(per_pos))
    return {"spec_num_drafts": stats.num_drafts, "spec_num_draft_tokens": stats.num_draft_tokens,
            "spec_num_accepted_tokens": stats.num_accepted_tokens, "spec_num_accepted_tokens_per_pos": per_pos}


def cache_config_info(config: EngineConfig) -> dict[str, str]:
    """vllm:cache_config_info's labels: the CacheConfig fields vLLM names that meshserve has, str() as vLLM's."""
    cc = config.cache_config
    return {"block_size": str(cc.block_size), "gpu_memory_utilization": str(cc.gpu_memory_utilization),
            "cache_dtype": str(cc.cache_dtype), "num_gpu_blocks_override": str(cc.num_gpu_blocks_override),
            "enable_prefix_caching": str(cc.enable_prefix_caching), "num_gpu_blocks": str(cc.num_blocks),
            "kv_offloading_size": str(cc.kv_offloading_size)}


def _logprobs_message(info) -> TokenLogprobs:
    return TokenLogprobs(info.token_id, info.logprob, info.rank, info.top_ids, info.top_logprobs)


class EngineCore:
    """The scheduler and the executor, driven one `step()` at a time; not thread-safe (one thread drives it).

    Requests come in as `EngineCoreRequest`s (one sequence each); every step returns an `EngineCoreOutputs`
    holding each request's new token ids (each token exactly once), the finish reasons decided here (stop
    token ids, max_tokens, max_model_len), new logprob ids/values, and the counters after the step.
    """

    def __init__(self, config: EngineConfig, source):
        t0 = time.perf_counter()
        self.config = config
        self.executor = make_executor(config, source)
        startup_timeline.mark("executor")
        config.cache_config.num_blocks = self.executor.collective_rpc("determine_num_blocks_all")
        startup_timeline.mark("KV sizing")
        self.executor.collective_rpc("allocate_kv_cache", config.cache_config.num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config)
        pc = config.parallel_config
        step_bytes, step_params = step_weights(config.model_config.hf_config,
                                               self.executor.collective_rpc("param_bytes"),
                                               pc.tensor_parallel_size * pc.pipeline_parallel_size)
        self.step_model = StepTimeModel(
            weight_bytes=step_bytes, params=step_params,
            kv_bytes_per_token=self.executor.collective_rpc("kv_bytes_per_token"),
            rates=DeviceRates.detect(config.device, config.model_config.dtype),
            graphed_mixed_tokens=self.executor.collective_rpc("mixed_graph_tokens"))
        self.scheduler.policy.step_model = self.step_model
        spec = config.speculative_config
        self.speculator = Speculator(spec, self.step_model) if spec is not None else None
        if spec is not None:
            self.scheduler.num_lookahead_tokens = spec.num_lookahead_tokens
        # KV offload tiers (one device: the runner is in this process and shares the CPU tier's memory)
        self.kv_offload = build_kv_offload(config, getattr(self.executor, "runner", None),
                                           self.scheduler.block_manager)
        # prefill/decode disaggregation: the KV connector and the transfers' block accounting (disagg/)
        self.disagg = build_kv_transfer(config.kv_transfer_config, getattr(self.executor, "runner", None),
                                             self.scheduler)
        sc = config.scheduler_config
        self._trace = open(sc.step_trace_path, "a") if sc.step_trace_path else None  # noqa: SIM115
        self.num_shed = 0
        self.requests: dict[str, Sequence] = {}
        self._prompt_logprobs_sent: dict[str, int] = {}  # request -> prompt positions already sent
        self._errors: list[RequestError] = []  # refused requests, reported with the next outputs
        self.num_generated_tokens = 0
        self.expert_load = ExpertLoadReader(getattr(self.executor, "runner", None))
        self.num_prompt_tokens = 0
        # vllm:iteration_tokens_total: each batch of outputs' tokens (new ones, and the prompt tokens computed for
        # the sequences whose first token it carries: _step_prompt_tokens, gathered by _process)
        self._step_prompt_tokens = 0
        self.iteration_tokens = [0] * (len(ITERATION_TOKENS_BUCKETS) + 2)  # per bucket (+Inf), then the sum
        self._last_iteration: int | None = None  # the last batch's observation (None: it had no outputs)
        self.pp_busy_s = self.pp_wall_s = 0.0  # last pipeline stage's compute vs wall time
        # async scheduling needs the runner in this process (its sampled ids feed the next step directly).
        # With speculation, a step that will propose waits for the step in flight (proposals and the
        # verified length are known on the host only), then launches before its outputs go out
        # (_step_inner); a step that will not propose is scheduled ahead as without speculation
        self.async_scheduling = (config.scheduler_config.async_scheduling
                                 and getattr(self.executor, "supports_async_scheduling", False))
        self.scheduler.async_mode = self.async_scheduling
        if self.speculator is not None and self.async_scheduling and self._verify_ahead_supported():
            self.scheduler.verify_ahead = self.speculator.propose_ahead = True
        self._in_flight: tuple[SchedulerOutput, PendingOutput, StepShape] | None = None
        # pipeline parallel: up to one step per stage in flight, each over sequences the others lack, so
        # every stage works on some step (no fill/drain bubble per step); the scheduler reads the same depth
        # from its config (its steps' shares and its running cap, SchedulerConfig.max_running)
        self.pipeline_depth = config.scheduler_config.pipeline_depth
        self._pipeline: collections.deque[tuple[SchedulerOutput, PendingOutput, StepShape]] = collections.deque()
        if self.pipeline_depth:
            self.scheduler.async_mode = self.scheduler.skip_pending = True
            self.scheduler.handoff_lag = handoff_lag(config.parallel_config)  # experimental, TokenHandoff
        self.info = CoreInfo(
            model=config.model_config.model,
            max_model_len=config.scheduler_config.max_model_len,
            vocab_size=config.model_config.vocab_size,
            block_size=config.cache_config.block_size,
            num_blocks=config.cache_config.num_blocks,
            max_num_batched_tokens=config.scheduler_config.max_num_batched_tokens,
            enable_chunked_prefill=config.scheduler_config.enable_chunked_prefill,
            tokenizer=config.model_config.tokenizer or None,
            eos_token_ids=config_eos_token_ids(config.model_config.hf_config, source.weights_dir),
            generation_defaults=config.model_config.generation_defaults,
            slo_ttft_s=config.scheduler_config.slo_ttft_s,
            slo_tpot_s=config.scheduler_config.slo_tpot_s,
            scheduling_policy=config.scheduler_config.scheduling_policy,
            num_lookahead_tokens=self.scheduler.num_lookahead_tokens,
            cache_config=cache_config_info(config),
        )
        capacity = self.info.capacity_tokens
        if capacity < self.info.max_model_len:  # vLLM refuses to start here; these pools serve shorter requests
            logger.warning("the KV cache holds %d tokens, fewer than max_model_len (%d): a request asking for more "
                           "is refused, and max_tokens left unset stops there; raise gpu_memory_utilization (or "
                           "cpu_kv_cache_bytes) or lower max_model_len to serve whole contexts", capacity,
                           self.info.max_model_len)
        # structured outputs: grammars compile on threads; their requests wait here, outside the scheduler
        self.grammar_waitlist = GrammarWaitlist(GrammarCompiler(
            config.model_config.tokenizer or None, config.model_config.vocab_size, self.info.eos_token_ids))
        # xgrammar (transformers with it: ~1.1 s of imports) and the tokenizer's vocabulary scan wait for the first
        # grammar request, on its compile thread, in its TTFT: a core that serves none never pays them
        self._grammar_seq_ids: set[str] = set()  # constrained requests in the scheduler (pruned lazily)
        self._bitmask_filler: BitmaskFiller | None = None  # built with the first constrained step
        self._grammar_probe = grammar_probe()  # a device A/B of the grammar's parts (grammar_probe.py); None: off
        self.scheduler.grammar_accepts = self._grammar_probe is None
        # the grammar masks of a step are filled once its forward is queued (_late_masks_hook) where rank 0's
        # runner, in this process, samples: one device, or tensor parallel (the workers get the step without
        # them: step_delta.py). With several pipeline stages the last stage samples, in a worker, so they are
        # filled before the step is sent and go with it
        self._late_masks = getattr(self.executor, "late_grammar_masks", False) and not self.pipeline_depth
        # one GPU, no speculation: the late masks fill on a thread (xgrammar lets go of the GIL while it fills)
        # and the runner queues the step's sampling only at the next launch, so the fill overlaps this thread's
        # outputs and next schedule instead of adding to them. On by default on a GPU (H200, 8B, concurrency
        # 64, schema answers: TPOT +29% over the same-length free run in line, +1.9% ahead; BENCHMARKS.md);
        # off on a CPU, where the "device" work (forward, logits) runs on the same cores and it was slower.
        # MESHSERVE_GRAMMAR_FILL_AHEAD=0 / =1 forces it off / on
        ahead = os.environ.get("MESHSERVE_GRAMMAR_FILL_AHEAD", "1" if config.device.startswith("cuda") else "0")
        self._fill_ahead = (self._late_masks and isinstance(self.executor, UniprocExecutor)
                            and self.speculator is None and ahead == "1")
        self._fill_thread: concurrent.futures.ThreadPoolExecutor | None = None
        startup_timeline.mark("scheduler")
        self.info.startup = [startup_timeline.current()]
        if pc.world_size > 1:  # the worker ranks' own phases (rank 0's are this process's)
            self.info.startup += self.executor.gather_rpc("startup_segment")[1:]
        logger.info("engine core ready in %.1f s: %s, %s on %s", time.perf_counter() - t0,
                    config.model_config.model, config.model_config.dtype, config.device)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> EngineCore:
        if spawns_local_ranks(args):
            process_start.warm_up()  # the ranks' forkserver imports torch while the config loads (transformers)
        config, source = create_engine_config(args)
        startup_timeline.mark("config")
        return cls(config, source)

    # -- requests --------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request the front end validated; raises InvalidArgumentError / PromptTooLongError."""
        rid = request.request_id
        if rid in self.requests:
            raise InvalidArgumentError(f"request id {rid} is already in use", param="request_id")
        vocab = self.config.model_config.vocab_size
        ids = request.prompt_token_ids
        if not ids or min(ids) < 0 or max(ids) >= vocab:  # the front end checked; a bad id would crash a step
            raise InvalidArgumentError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        seq = Sequence(seq_id=rid, request_id=rid, index=0, prompt_token_ids=ids,
                       params=request.sampling_params, max_tokens=request.max_tokens,
                       arrival_time=request.arrival_time or time.monotonic(), priority=request.priority,
                       slo_ttft_s=request.slo_ttft_s, slo_tpot_s=request.slo_tpot_s)
        if self.disagg is not None and self.disagg.add(seq):
            pass  # its KV is pulled from a producer first; it joins the scheduler once that is in
        elif seq.params.uses_grammar:  # to the scheduler once its grammar is compiled (off this thread)
            self.scheduler.check_fits(seq.num_prompt_tokens, seq.max_tokens)
            self.grammar_waitlist.add(seq)
        else:
            self.scheduler.add(seq)  # check_fits raises before anything is recorded
        self.requests[rid] = seq
        self.num_prompt_tokens += len(ids)

    def add_request_or_report(self, request: EngineCoreRequest) -> None:
        """add_request for a core in another thread or process: a refusal goes out with the next outputs."""
        try:
            self.add_request(request)
        except Exception as e:
            self._errors.append(error_to_message(request.request_id, e))

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop requests now; their KV blocks return to the pool. Unknown or finished ids are ignored."""
        for rid in request_ids:
            seq = self.requests.pop(rid, None)
            if seq is not None:
                self.grammar_waitlist.remove(rid)
                if self.disagg is not None and self.disagg.abort(seq):
                    continue  # its KV is still arriving: the blocks are freed when the pull ends
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
                self._prompt_logprobs_sent.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or (self.disagg is not None and self.disagg.busy)

    def idle_outputs(self) -> EngineCoreOutputs:
        """Refusals and fresh counters without a step (published right after taking commands)."""
        return self._outputs([])

    # -- the step --------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """One scheduling decision and one forward pass; returns what changed.

        With async scheduling the step launched here is only read back by the next call: schedule and
        launch step n+1, then wait for step n's tokens and process them, so the host work of both
        overlaps the GPU's work on step n+1. Sequences whose tokens are pending are scheduled with
        placeholders the runner fills from the device; a sequence that stopped at step n wastes its
        slot in step n+1 (its token is dropped).
        """
        if self.disagg is not None:
            return self._with_transfers(self._step_inner())
        return self._step_inner()

    def _step_inner(self) -> EngineCoreOutputs:
        if self.pipeline_depth:
            return self._step_pipelined()
        if not self.async_scheduling:
            sched_out = self._schedule()
            if sched_out.is_empty and not sched_out.finished_seq_ids and not sched_out.kv_transfers:
                return self._outputs([])
            shape = step_shape(sched_out)
            return self._outputs(self._process(sched_out, self.executor.execute(sched_out), shape))
        first: list[EngineCoreOutput] = []
        if self._in_flight is not None and (self._needs_known_history() or self._needs_verified_tokens()):
            # penalties read the pending token; so do proposals, when they cannot be placed behind the step
            # in flight: read it back first, then launch the next step before its outputs go out
            first = self._drain()
        with phase("core.schedule"):
            sched_out = self._schedule()
        drained = self._late_masks_hook(sched_out)  # filled during the launch
        launched = None
        if not sched_out.is_empty or sched_out.finished_seq_ids or sched_out.kv_transfers:
            with phase("core.launch"):
                launched = self.executor.execute_async(sched_out)
        with phase("core.drain"):
            outputs = first + drained + self._drain()
        if launched is not None:
            self._in_flight = (sched_out, launched, step_shape(sched_out))
        with phase("core.outputs"):
            return self._outputs(outputs)

    def _with_transfers(self, step_outputs: EngineCoreOutputs) -> EngineCoreOutputs:
        """Apply the KV connector's news after a step: received prompts join the scheduler with their first
        token (sent now), failed pulls end their requests, acknowledged or expired holds free their blocks.
        With nothing scheduled, wait a little for news instead of spinning."""
        idle = not self.scheduler.has_unfinished()
        seen = self.disagg.num_events
        firsts = self.disagg.poll(wait_s=0.005 if idle else 0.0)
        for out in firsts:
            self.num_generated_tokens += 1
            if out.finished:
                self.requests.pop(out.request_id, None)
        errors = self.disagg.take_errors()
        for err in errors:
            self.requests.pop(err.request_id, None)
        if firsts or errors:
            step_outputs.outputs = list(step_outputs.outputs) + firsts
            step_outputs.errors = list(step_outputs.errors) + errors
        if firsts:  # one batch of outputs with the step's: its tokens-per-iteration observation grows by them
            self._observe_iteration(firsts, joining=self._last_iteration)
        if self.disagg.num_events != seen:  # blocks came or went: the counters published must say so
            step_outputs.stats = self.scheduler_stats()
        return step_outputs

    def _step_pipelined(self) -> EngineCoreOutputs:
        """Launch a step while fewer than pipeline_depth are in flight; read back the oldest once the
        pipeline is full or nothing new could be scheduled (all running sequences wait on a step)."""
        launched = False
        if len(self._pipeline) < self.pipeline_depth:
            sched_out = self._schedule()
            if not sched_out.is_empty or sched_out.finished_seq_ids or sched_out.kv_transfers:
                self._pipeline.append((sched_out, self.executor.execute_async(sched_out), step_shape(sched_out)))
                launched = not sched_out.is_empty
        outputs = []
        if self._pipeline and (len(self._pipeline) == self.pipeline_depth or not launched):
            sched_out, pending, shape = self._pipeline.popleft()
            outputs = self._process(sched_out, pending.result(), shape)
        return self._outputs(outputs)

    def _admit_compiled(self) -> None:
        """Move requests whose grammar is ready into the scheduler; report those whose compile failed."""
        if not self.scheduler.has_unfinished():
            self.grammar_waitlist.wait(0.005)  # nothing else to run: don't spin while a grammar compiles
        ready, failed = self.grammar_waitlist.pop_ready()
        for seq in ready:
            self.scheduler.add(seq)
            self._grammar_seq_ids.add(seq.seq_id)
        for seq, error in failed:
            self.requests.pop(seq.request_id, None)
            self._errors.append(error_to_message(seq.request_id, error))

    def _late_masks_hook(self, sched_out: SchedulerOutput) -> list[EngineCoreOutput]:
        """Grammar masks filled while the device runs the forward. A constrained sequence's mask for step
        n+1 needs its token of step n; filled before the launch, the device would wait for the CPU (and
        async scheduling would stop for everyone while a constrained request runs). Instead the runner
        calls sched_out.before_sample once the forward is queued: with step n in flight, the hook reads it
        back (done on the device: it was queued first), processes it (the matchers accept its tokens), then
        fills step n+1's masks. Returns the list step n's outputs go into when the hook runs. Rank 0's runner
        calls it (one device, or TP: rank 0 alone samples, after the step went out to the workers without the
        hook); with pipeline stages the sampler is a worker, so there the masks come first (_late_masks)."""
        drained: list[EngineCoreOutput] = []
        fill = sched_out.before_sample
        if fill is None or self._in_flight is None:
            return drained

        def hook() -> None:
            drained.extend(self._drain())
            fill()

        sched_out.before_sample = hook
        return drained

    def _needs_known_history(self) -> bool:
        """Whether the next step must wait for the step in flight: penalties and bad words read the pending
        token; a grammar's mask does too, but with late masks it waits inside the next step (_late_masks_hook)."""
        if not self._late_masks:
            return self.scheduler.needs_known_history
        return any(seq.params.reads_output_history for seq in self.scheduler.running)

    def _verify_ahead_supported(self) -> bool:
        """Whether a sequence may verify proposals behind its own step in flight: host-side (n-gram)
        proposals, one in-process rank (the runner moves the chunk back by the rejected count it holds), and
        attention that reads sequence lengths on the device (the reference kernels read host lengths: exact
        on a CPU, where reading them is free; MLA's prefill splits by host lengths on a GPU too)."""
        runner = getattr(self.executor, "runner", None)
        if self.speculator.proposer is None or not isinstance(self.executor, UniprocExecutor) or runner is None:
            return False
        mla = getattr(self.config.model_config.hf_config, "kv_lora_rank", None)
        return self.config.device == "cpu" or (runner.kernels.attention_backend == "triton" and not mla)

    def _needs_verified_tokens(self) -> bool:
        """Whether the next step must wait for the step in flight under speculative decoding: the step in
        flight verifies proposals (the next inputs follow its accepted run, whose length only the host
        knows), or one of its sampling sequences may get proposals after it (the n-gram proposer reads
        its new token; a draft model proposes on the ranks after every step)."""
        if self.speculator is None or self.scheduler.verify_ahead:
            return False
        sched_out = self._in_flight[0]
        if any(e.num_spec_tokens for e in sched_out.scheduled):
            return True
        if self.speculator.proposer is None:
            return True
        sampling = [self.requests.get(e.seq_id) for e in sched_out.scheduled if e.do_sample]
        return self.speculator.may_propose([s for s in sampling if s is not None], self.scheduler.num_running)

    def _fill_grammar_bitmasks(self, sched_out: SchedulerOutput, ahead: bool = False) -> None:
        """The step's grammar masks, a row per sampling row (sampling_indices): a constrained sequence's row
        holds the tokens its grammar allows next (its matcher has seen every output token: the step before
        was processed first), every other row allows all. A sequence that finished meanwhile gets none: its
        token is dropped. One batched fill into a reused host buffer (structured/bitmask_filler.py); ahead: on
        the fill thread (the matchers are read there while this thread goes on: nothing else touches them
        before the runner waits for the fill, at the next launch or read-back)."""
        self._grammar_seq_ids &= self.requests.keys()
        if not self._grammar_seq_ids:
            return
        matchers = []
        for i in sampling_indices(sched_out.scheduled):
            seq = self.requests.get(sched_out.scheduled[i].seq_id)
            constrained = (seq is not None and seq.grammar is not None and not seq.is_finished
                           and seq.grammar_after_token is None)  # a reasoning span is not masked
            matchers.append(seq.grammar if constrained else None)
        if any(m is not None for m in matchers) and self._grammar_probe != "no_masks":
            if self._bitmask_filler is None:  # pinned: the runner's copy of it to the GPU does not wait
                pin = self._late_masks and self.config.device.startswith("cuda")
                self._bitmask_filler = BitmaskFiller(self.config.model_config.vocab_size, pin_memory=pin)
            if self._grammar_probe == "no_matchers":  # all rows allow every token: the masks' way, no grammar
                matchers = [None] * len(matchers)
            if ahead:  # a future the runner resolves when it queues the sampling (ModelRunner.finish_deferred)
                if self._fill_thread is None:
                    self._fill_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar-fill")
                sched_out.grammar_bitmask = self._fill_thread.submit(self._bitmask_filler.fill, matchers)
            else:
                sched_out.grammar_bitmask = self._bitmask_filler.fill(matchers)

    def _schedule(self) -> SchedulerOutput:
        if len(self.grammar_waitlist):
            self._admit_compiled()
        sched_out = self.scheduler.schedule()
        if self._grammar_seq_ids:
            if self._late_masks:
                sched_out.before_sample = functools.partial(self._fill_grammar_bitmasks, sched_out, self._fill_ahead)
            else:
                self._fill_grammar_bitmasks(sched_out)
        for seq in self.scheduler.shed:  # too late for their time-to-first-token target: a clean 429
            self.requests.pop(seq.request_id, None)
            self._prompt_logprobs_sent.pop(seq.request_id, None)
            self._errors.append(error_to_message(seq.request_id, ServiceLevelShedError(
                "the server cannot meet this request's time-to-first-token target now; retry later")))
        self.num_shed += len(self.scheduler.shed)
        self.scheduler.shed.clear()
        now = time.monotonic()
        for entry in sched_out.scheduled:
            seq = self.requests.get(entry.seq_id)
            if seq is not None and seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
        if (self.kv_offload is not None and sched_out.is_empty and not sched_out.kv_transfers
                and self._in_flight is None and not self._pipeline):
            self.kv_offload.wait_io()  # waiting on disk reads only: block on them rather than spin (GIL)
        return sched_out

    def _drain(self) -> list[EngineCoreOutput]:
        """Wait for the step in flight and process its tokens."""
        if self._in_flight is None:
            return []
        sched_out, pending, shape = self._in_flight
        self._in_flight = None
        return self._process(sched_out, pending.result(), shape)

    def _observe_step(self, shape: StepShape, runner_out: ModelRunnerOutput, masked_rows: int = 0) -> None:
        """Feed the measured step to the step-time model (and the trace, when asked for: with the host's wait
        for the step, ~0 when the host is the slower side, and the rows under a grammar mask)."""
        if shape.num_tokens == 0 or runner_out.device_time_s <= 0:
            return
        predicted = self.step_model.predict(shape)
        self.step_model.observe(shape, runner_out.device_time_s)
        if self._trace is not None:
            self._trace.write(json.dumps({
                "t": round(time.monotonic(), 6), "tokens": shape.num_tokens, "seqs": shape.num_seqs,
                "context": shape.context_tokens, "predicted_s": round(predicted, 6),
                "actual_s": round(runner_out.device_time_s, 6), "wait_s": round(runner_out.host_wait_s, 6),
                "masked_rows": masked_rows, "running": self.scheduler.num_running,
                "waiting": self.scheduler.num_waiting}) + "\n")

    def _observe_iteration(self, outputs: list[EngineCoreOutput], joining: int | None = None) -> None:
        """vllm:iteration_tokens_total, once per batch of outputs (as vLLM's front end observes each batch):
        its new tokens and the prompt tokens computed for its first tokens. joining: the observation of the batch
        these outputs join (replaced by their sum)."""
        if not outputs:
            self._last_iteration = None
            return
        n = self._step_prompt_tokens + sum(len(o.new_token_ids) for o in outputs)
        self._step_prompt_tokens = 0
        if joining is not None:
            self.iteration_tokens[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, joining)] -= 1
            self.iteration_tokens[-1] -= joining
            n += joining
        self.iteration_tokens[bisect.bisect_left(ITERATION_TOKENS_BUCKETS, n)] += 1
        self.iteration_tokens[-1] += n
        self._last_iteration = n

    def _outputs(self, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        self._observe_iteration(outputs)
        errors, self._errors = self._errors, []
        return EngineCoreOutputs(outputs=outputs, errors=errors, stats=self.scheduler_stats(),
                                 timestamp=time.monotonic())

    def _process(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput,
                 shape: StepShape) -> list[EngineCoreOutput]:
        masks = sched_out.grammar_bitmask
        self._observe_step(shape, runner_out, 0 if masks is None else int(masks.shape[0]))
        if runner_out.wall_s:
            self.pp_busy_s += runner_out.busy_s
            self.pp_wall_s += runner_out.wall_s
        outputs: dict[str, EngineCoreOutput] = {}
        self._collect_prompt_logprobs(runner_out, outputs)
        updated = self.scheduler.update_after_step(sched_out, runner_out.sampled, runner_out.spec_token_ids)
        if self.speculator is not None:
            self.speculator.after_step(sched_out, runner_out, updated, self.scheduler.num_running)
        logprobs, num_generated = runner_out.logprobs, 0  # (locals: every row, every step)
        for seq in updated:
            rid = seq.request_id
            n = seq.num_step_tokens  # more than one when proposals were accepted
            tokens = seq.output_token_ids
            out = outputs.get(rid)
            if out is None:
                out = outputs[rid] = EngineCoreOutput(rid, tokens[-n:])
            else:
                out.new_token_ids = tokens[-n:]
            num_generated += n
            if len(tokens) == n:
                out.num_cached_tokens = seq.num_cached_tokens
                out.num_external_cached_tokens = seq.num_external_cached_tokens
                out.first_times = (seq.queued_time, seq.first_scheduled_time)
                self._step_prompt_tokens += seq.num_prompt_tokens - seq.num_cached_tokens
            info = logprobs.get(seq.seq_id) if logprobs else None
            if info is not None:
                out.new_logprobs = [_logprobs_message(info)]
            if seq.status.finished:
                out.finish_reason = seq.status.finish_reason
                if self.disagg is not None:
                    out.kv_transfer_params = self.disagg.take_handle(rid)
                out.stop_reason = seq.stop_reason if isinstance(seq.stop_reason, int) else None
                self.requests.pop(rid, None)
                self._prompt_logprobs_sent.pop(rid, None)
        self.num_generated_tokens += num_generated
        return list(outputs.values())

    def _collect_prompt_logprobs(self, runner_out: ModelRunnerOutput, outputs: dict[str, EngineCoreOutput]) -> None:
        for seq_id, (start, infos) in runner_out.prompt_logprobs.items():
            if seq_id not in self.requests:
                continue
            # a recomputed (preempted) prefill scores positions it already scored: send each position once
            sent = self._prompt_logprobs_sent.get(seq_id, 0)
            fresh = [_logprobs_message(info) for offset, info in enumerate(infos) if start + offset >= sent]
            if not fresh:
                continue
            self._prompt_logprobs_sent[seq_id] = start + len(infos)
            outputs[seq_id] = EngineCoreOutput(seq_id, new_prompt_logprobs=fresh)

    # -- stats -----------------------------------------------------------------------------------
    def scheduler_stats(self, force_expert_load: bool = False) -> SchedulerStats:
        bm = self.scheduler.block_manager
        policy, model = self.scheduler.policy, self.step_model
        chunk = self.config.scheduler_config.max_num_batched_tokens
        return SchedulerStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting + len(self.grammar_waitlist),
            num_waiting_for_grammar=len(self.grammar_waitlist),
            num_waiting_for_kv=self.disagg.num_receiving if self.disagg is not None else 0,
            kv_cache_usage=bm.usage,
            num_blocks=bm.num_blocks,
            prefix_cache_queries=bm.stats.queries,
            prefix_cache_hits=bm.stats.hits,
            prefix_cache_hit_rate=bm.stats.hit_rate,
            prefix_cache_restored_hits=bm.stats.restored,
            prefix_cache_external_queries=bm.stats.external_queries,
            prefix_cache_external_hits=bm.stats.external_hits,
            iteration_tokens=list(self.iteration_tokens),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.num_prompt_tokens,
            generation_tokens=self.num_generated_tokens,
            pp_bubble=1.0 - self.pp_busy_s / self.pp_wall_s if self.pp_wall_s else 0.0,
            num_shed=self.num_shed,
            queue_wait_s=policy.queue_wait_s(list(self.scheduler.waiting), time.monotonic()),
            prefill_s_per_token=policy.prefill_time_s(chunk) / chunk,
            step_time_predicted_s=model.last_predicted_s,
            step_time_actual_s=model.last_actual_s,
            step_time_model_error=model.abs_error_ewma,
            **(spec_decode_stats(self.speculator.stats, self.speculator.config.num_speculative_tokens)
               if self.speculator is not None else {}),
            **(self.kv_offload.snapshot().as_dict() if self.kv_offload is not None else {}),
            **(self.disagg.snapshot() if self.disagg is not None else {}),
            expert_load=self.expert_load.poll(force_expert_load),
        )

    def stats(self) -> dict:
        """The counters as a dict (the keys of SchedulerStats)."""
        import msgspec

        return msgspec.structs.asdict(self.scheduler_stats(force_expert_load=True))

    @property
    def runner(self):
        """Rank 0's model runner (the whole model when not split)."""
        return self.executor.runner

    def shutdown(self) -> None:
        pp = self.config.parallel_config.pipeline_parallel_size
        if pp > 1 and self.pp_wall_s:
            logger.info("pipeline bubble measured on the last stage: %.1f%% (%d stages, one step per stage in "
                        "flight)", 100 * self.scheduler_stats().pp_bubble, pp)
        if self._trace is not None:
            self._trace.close()
        self.grammar_waitlist.compiler.shutdown()
        if self._fill_thread is not None:
            self._fill_thread.shutdown(wait=True)
        if self.disagg is not None:
            self.disagg.close()
        if self.kv_offload is not None:  # the cached blocks go to disk for the next start
            self.kv_offload.close(self.scheduler.block_manager.pool.cached, self.runner.kv_transfer.run)
        try:  # read back the steps still in flight, so every rank stops at a clean point of the protocol
            while self._pipeline:
                self._pipeline.popleft()[1].result()
        except Exception:  # noqa: BLE001  (a dead rank: the executor's shutdown kills the rest)
            self._pipeline.clear()
        self.executor.shutdown()
