"""The engine: takes requests, runs scheduler + model runner step by step, returns RequestOutputs.

The loop is small on purpose (vLLM v1's shape): schedule -> execute -> update -> detokenize/stop -> outputs.
"""

from __future__ import annotations

import itertools
import logging
import time

from meshserve.config import EngineArgs, EngineConfig
from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.engine.engine_config import create_engine_config
from meshserve.distributed.executor import make_executor
from meshserve.engine.model_runner import ModelRunnerOutput, PendingOutput
from meshserve.engine.request_state import RequestState, position_logprobs
from meshserve.engine.scheduler import Scheduler
from meshserve.engine.scheduler_output import SchedulerOutput
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.errors import InvalidArgumentError, PromptTooLongError
from meshserve.outputs import RequestMetrics, RequestOutput
from meshserve.sampling import SamplingParams

logger = logging.getLogger(__name__)

PromptType = str | dict | list[int]


def load_tokenizer(path: str | None):
    if not path:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(hf_config, tokenizer, model_dir: str | None) -> set[int]:
    """EOS ids from generation_config.json, the model config and the tokenizer, merged."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))

    if model_dir:
        try:
            from transformers import GenerationConfig

            add(GenerationConfig.from_pretrained(model_dir, local_files_only=True).eos_token_id)
        except Exception:  # no generation_config.json: fine
            pass
    add(getattr(hf_config, "eos_token_id", None))
    if tokenizer is not None:
        add(tokenizer.eos_token_id)
    return ids


class Engine:
    """Synchronous engine core. Not thread-safe: one thread drives add_request/abort/step."""

    def __init__(self, config: EngineConfig, source):
        t0 = time.perf_counter()
        self.config = config
        self.tokenizer = load_tokenizer(source.tokenizer_dir)
        self.executor = make_executor(config, source)
        config.cache_config.num_blocks = self.executor.collective_rpc("determine_num_blocks_all")
        self.executor.collective_rpc("allocate_kv_cache", config.cache_config.num_blocks)
        self.scheduler = Scheduler(config.scheduler_config, config.cache_config)
        self.eos_token_ids = eos_token_ids(config.model_config.hf_config, self.tokenizer, source.weights_dir)
        self.requests: dict[str, RequestState] = {}
        self._seq_to_request: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self.num_generated_tokens = 0
        self.num_prompt_tokens = 0
        self.pp_busy_s = self.pp_wall_s = 0.0  # last pipeline stage's compute vs wall time
        # async scheduling needs the runner in this process (its sampled ids feed the next step directly)
        self.async_scheduling = (config.scheduler_config.async_scheduling
                                 and getattr(self.executor, "supports_async_scheduling", False))
        self.scheduler.async_mode = self.async_scheduling
        self._in_flight: tuple[SchedulerOutput, PendingOutput] | None = None
        logger.info("engine ready in %.1f s: %s, %s on %s", time.perf_counter() - t0,
                    config.model_config.model, config.model_config.dtype, config.device)

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "Engine":
        config, source = create_engine_config(args)
        return cls(config, source)

    # -- requests --------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._ids))

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidArgumentError("prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, list):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string or token ids, got {type(prompt).__name__}",
                                       param="prompt")
        if self.tokenizer is None:
            raise InvalidArgumentError("this model has no tokenizer: send prompt_token_ids", param="prompt")
        return prompt, self.tokenizer(prompt).input_ids

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        """Validate, tokenize and queue a request; raises InvalidArgumentError / PromptTooLongError."""
        params = (params or SamplingParams()).clone()
        params.validate()
        request_id = request_id if request_id is not None else self.next_request_id()
        if request_id in self.requests:
            raise InvalidArgumentError(f"request id {request_id} is already in use", param="request_id")
        text, token_ids = self.tokenize_prompt(prompt)
        vocab = self.config.model_config.vocab_size
        if not token_ids:
            raise InvalidArgumentError("the prompt is empty", param="prompt")
        if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in token_ids):
            raise InvalidArgumentError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):  # out of range, they crash the min_tokens ban
            raise InvalidArgumentError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        max_len = self.config.scheduler_config.max_model_len
        if len(token_ids) >= max_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; max_model_len is {max_len} (room for at least one "
                "new token is needed)", param="prompt")
        max_tokens = params.max_tokens if params.max_tokens is not None else max_len - len(token_ids)
        self.scheduler.check_fits(len(token_ids), max_tokens)
        params._all_stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            params._all_stop_token_ids |= self.eos_token_ids

        arrival = arrival_time if arrival_time is not None else time.monotonic()
        seqs, detoks = [], []
        for i in range(params.n):
            child = params
            if params.n > 1 and params.seed is not None:
                child = params.clone()
                child.seed = params.seed + i  # distinct but reproducible samples
                child._all_stop_token_ids = params._all_stop_token_ids
            seq = Sequence(seq_id=f"{request_id}#{i}", request_id=request_id, index=i,
                           prompt_token_ids=token_ids, params=child, max_tokens=max_tokens, arrival_time=arrival)
            seqs.append(seq)
            detoks.append(IncrementalDetokenizer(self.tokenizer, token_ids, params) if self.tokenizer else None)
        state = RequestState(request_id, text, token_ids, params, seqs, detoks, RequestMetrics(arrival))
        for seq in seqs:
            self.scheduler.add(seq)
            self._seq_to_request[seq.seq_id] = state
        self.requests[request_id] = state
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks return to the pool. False if it is unknown or done."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for seq in state.seqs:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
            self._seq_to_request.pop(seq.seq_id, None)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    # -- the step --------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One scheduling decision and one forward pass; returns the requests that changed (or, with
        finished_only, just those that finished: offline batches need no per-step snapshots).

        With async scheduling the step launched here is only read back by the next call: schedule and
        launch step n+1, then wait for step n's tokens and process them, so the host work of both
        overlaps the GPU's work on step n+1. Sequences whose tokens are pending are scheduled with
        placeholders the runner fills from the device; a sequence that stopped at step n wastes its
        slot in step n+1 (its token is dropped).
        """
        if not self.async_scheduling:
            sched_out = self._schedule()
            if sched_out.is_empty and not sched_out.finished_seq_ids:
                return []
            return self._process(sched_out, self.executor.execute(sched_out), finished_only)
        if self._in_flight is not None and self.scheduler.needs_known_history:
            return self._drain(finished_only)  # penalties read the pending token: no overlap this step
        sched_out = self._schedule()
        launched = None
        if not sched_out.is_empty or sched_out.finished_seq_ids:
            launched = self.executor.execute_async(sched_out)
        outputs = self._drain(finished_only)
        if launched is not None:
            self._in_flight = (sched_out, launched)
        return outputs

    def _schedule(self) -> SchedulerOutput:
        sched_out = self.scheduler.schedule()
        now = time.monotonic()
        for entry in sched_out.scheduled:
            state = self._seq_to_request.get(entry.seq_id)
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now
        return sched_out

    def _drain(self, finished_only: bool) -> list[RequestOutput]:
        """Wait for the step in flight and process its tokens."""
        if self._in_flight is None:
            return []
        sched_out, pending = self._in_flight
        self._in_flight = None
        return self._process(sched_out, pending.result(), finished_only)

    def _process(self, sched_out: SchedulerOutput, runner_out: ModelRunnerOutput,
                 finished_only: bool) -> list[RequestOutput]:
        if runner_out.wall_s:
            self.pp_busy_s += runner_out.busy_s
            self.pp_wall_s += runner_out.wall_s
        now = time.monotonic()
        touched: dict[str, RequestState] = {}
        self._collect_prompt_logprobs(runner_out)
        updated = self.scheduler.update_after_step(sched_out, runner_out.sampled)
        for seq in updated:
            state = self._seq_to_request[seq.seq_id]
            touched[state.request_id] = state
            self._process_new_token(state, seq, runner_out, now)
        outputs = []
        for state in touched.values():
            if not finished_only or state.finished:
                outputs.append(state.to_output())
            if state.finished:
                state.metrics.finished_time = now
                self.requests.pop(state.request_id, None)
                for seq in state.seqs:
                    self._seq_to_request.pop(seq.seq_id, None)
        return outputs

    def _collect_prompt_logprobs(self, runner_out: ModelRunnerOutput) -> None:
        for seq_id, (start, infos) in runner_out.prompt_logprobs.items():
            state = self._seq_to_request.get(seq_id)
            if state is None or state.prompt_logprobs is None or not seq_id.endswith("#0"):
                continue
            # a recomputed (preempted) prefill scores positions it already scored: keep the first
            for offset, info in enumerate(infos):
                if start + 1 + offset == len(state.prompt_logprobs):
                    state.prompt_logprobs.append(position_logprobs(info, self._decode_token))

    def _decode_token(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer is not None else None

    def _process_new_token(self, state: RequestState, seq: Sequence, out: ModelRunnerOutput, now: float) -> None:
        i = seq.index
        token = seq.output_token_ids[-1]
        self.num_generated_tokens += 1
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        info = out.logprobs.get(seq.seq_id)
        if info is not None:
            state.logprobs[i].append(position_logprobs(info, self._decode_token))
            state.cumulative_logprobs[i] += info.logprob
        detok = state.detokenizers[i]
        if detok is None:
            return
        # a token that ended the sequence (EOS, stop_token_ids) is not part of the text, like vLLM
        stopped_by_token = seq.status == SequenceStatus.FINISHED_STOPPED
        stop_str = None
        if not stopped_by_token or seq.params.include_stop_str_in_output:
            stop_str = detok.update([token])
        if stop_str is not None and not seq.is_finished:
            seq.stop_reason = stop_str
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        state.texts[i] += detok.get_delta(finished=seq.is_finished)

    @property
    def runner(self):
        """Rank 0's model runner (the whole model when not split)."""
        return self.executor.runner

    def shutdown(self) -> None:
        pp = self.config.parallel_config.pipeline_parallel_size
        if pp > 1 and self.pp_wall_s:
            micro = min(pp, self.config.scheduler_config.max_num_seqs)
            logger.info("pipeline bubble measured on the last stage: %.1f%% (%d stages, up to %d micro-batches; "
                        "fill/drain alone would be %.1f%%)", 100 * self.stats()["pp_bubble"], pp, micro,
                        100 * (pp - 1) / (micro + pp - 1))
        self.executor.shutdown()

    # -- stats -----------------------------------------------------------------------------------
    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        return {
            "num_running": self.scheduler.num_running,
            "num_waiting": self.scheduler.num_waiting,
            "kv_cache_usage": bm.usage,
            "num_blocks": bm.num_blocks,
            "prefix_cache_queries": bm.stats.queries,
            "prefix_cache_hits": bm.stats.hits,
            "prefix_cache_hit_rate": bm.stats.hit_rate,
            "num_preemptions": self.scheduler.num_preemptions,
            "prompt_tokens": self.num_prompt_tokens,
            "generation_tokens": self.num_generated_tokens,
            "pp_bubble": 1.0 - self.pp_busy_s / self.pp_wall_s if self.pp_wall_s else 0.0,
        }
