"""An engine core with no model and no scheduler: a token per running request per step, steps at a fixed rate.

It speaks the EngineCore interface that `run_core_loop` drives (add, abort, step, idle outputs, info), so the
real front end (API server, output processor, ZeroMQ channel) can be measured on the CPU with the engine's cost
fixed: `meshserve bench frontend`. Token ids are drawn at random from the real tokenizer's vocabulary, so
detokenization costs what it costs. Its queue-wait prediction is a plain step-time model (a request waits for
the slots ahead of it to free up), enough to drive admission in tests; with shed_late, a queued request that can
no longer start before its time-to-first-token target is dropped with the real core's 429 (slo_shed), so both
kinds of refusal can be measured without a GPU.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass
from functools import partial

from meshserve.config import EngineArgs
from meshserve.engine.messages import (
    CoreInfo,
    EngineCoreOutput,
    EngineCoreOutputs,
    EngineCoreRequest,
    SchedulerStats,
    error_to_message,
)
from meshserve.errors import InvalidArgumentError, ServiceLevelShedError


@dataclass
class _Running:
    request: EngineCoreRequest
    num_out: int = 0
    first_scheduled: float = 0.0


class FakeEngineCore:
    """Steps every step_s seconds (sleeping out the rest of each step); up to max_num_seqs requests run at once."""

    def __init__(self, info: CoreInfo, step_s: float = 0.02, max_num_seqs: int = 256, seed: int = 0,
                 shed_late: bool = True):
        self.info = info
        self.shed_late = shed_late
        self.step_s = step_s
        self.max_num_seqs = max_num_seqs
        self.rng = random.Random(seed)
        self.waiting: deque[EngineCoreRequest] = deque()
        self.running: dict[str, _Running] = {}
        self._errors: list = []
        self._next_step_at = 0.0
        self.num_prompt_tokens = 0
        self.num_generated_tokens = 0
        self.num_shed = 0

    # -- the EngineCore interface ----------------------------------------------------------------
    def add_request_or_report(self, request: EngineCoreRequest) -> None:
        ids = request.prompt_token_ids
        if not ids or min(ids) < 0 or max(ids) >= self.info.vocab_size:
            self._errors.append(error_to_message(request.request_id, InvalidArgumentError(
                f"prompt token ids must be integers in [0, {self.info.vocab_size})", param="prompt")))
            return
        self.waiting.append(request)
        self.num_prompt_tokens += len(ids)

    def abort_requests(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        for rid in request_ids:
            self.running.pop(rid, None)
        if any(r.request_id in gone for r in self.waiting):
            self.waiting = deque(r for r in self.waiting if r.request_id not in gone)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def idle_outputs(self) -> EngineCoreOutputs:
        return self._outputs([])

    def step(self) -> EngineCoreOutputs:
        now = time.monotonic()
        if self._next_step_at > now:
            time.sleep(self._next_step_at - now)
        now = time.monotonic()
        self._next_step_at = max(now, self._next_step_at) + self.step_s
        if self.shed_late:
            self._shed_late(now)
        while self.waiting and len(self.running) < self.max_num_seqs:
            req = self.waiting.popleft()
            self.running[req.request_id] = _Running(req, first_scheduled=now)
        outputs = []
        low, high = 100, self.info.vocab_size
        for rid, r in list(self.running.items()):
            r.num_out += 1
            out = EngineCoreOutput(rid, [self.rng.randrange(low, high)])
            if r.num_out == 1:
                out.first_times = (None, r.first_scheduled)  # (a stand-in: queued at arrival, the front end's)
            if r.num_out >= r.request.max_tokens:
                out.finish_reason = "length"
                del self.running[rid]
            outputs.append(out)
        self.num_generated_tokens += len(outputs)
        return self._outputs(outputs)

    def shutdown(self) -> None:
        self.waiting.clear()
        self.running.clear()

    def _shed_late(self, now: float) -> None:
        """Drop queued requests whose start, when the slots ahead of them free up, is past their TTFT target
        (the real scheduler's rule, scheduling_policy.shed_late, on this core's own arithmetic)."""
        free = self.max_num_seqs - len(self.running)
        ends = sorted(r.request.max_tokens - r.num_out for r in self.running.values())  # steps until each ends
        kept: deque[EngineCoreRequest] = deque()
        for req in self.waiting:
            target = req.slo_ttft_s if req.slo_ttft_s is not None else self.info.slo_ttft_s
            ahead = len(kept) - free  # requests of the queue that must wait for a running one to end first
            start_s = 0.0 if ahead < 0 or not ends else ends[min(ahead, len(ends) - 1)] * self.step_s
            if target is not None and req.arrival_time and now - req.arrival_time + start_s > target:
                self._errors.append(error_to_message(req.request_id, ServiceLevelShedError(
                    "the server cannot meet this request's time-to-first-token target now; retry later")))
                self.num_shed += 1
            else:
                kept.append(req)
        self.waiting = kept

    # -- counters --------------------------------------------------------------------------------
    def _queue_wait_s(self) -> float:
        """Steps until a request joining now starts: the queue ahead of it drains a batch at a time, each batch
        taking the mean remaining output length of the running requests."""
        if len(self.running) + len(self.waiting) < self.max_num_seqs:
            return 0.0
        remaining = [r.request.max_tokens - r.num_out for r in self.running.values()] or [1]
        per_batch = sum(remaining) / len(remaining) * self.step_s
        return (1 + len(self.waiting) // self.max_num_seqs) * per_batch

    def _outputs(self, outputs: list[EngineCoreOutput]) -> EngineCoreOutputs:
        errors, self._errors = self._errors, []
        stats = SchedulerStats(num_running=len(self.running), num_waiting=len(self.waiting),
                               num_blocks=self.info.num_blocks, prompt_tokens=self.num_prompt_tokens,
                               generation_tokens=self.num_generated_tokens, queue_wait_s=self._queue_wait_s(),
                               step_time_predicted_s=self.step_s, step_time_actual_s=self.step_s)
        return EngineCoreOutputs(outputs, errors, stats, time.monotonic())


def fake_core_info(args: EngineArgs) -> CoreInfo:
    """The CoreInfo the real core would report for args' model (config and tokenizer only: no weights load)."""
    from meshserve.engine.engine_config import create_engine_config

    config, _ = create_engine_config(args)
    mc, sc = config.model_config, config.scheduler_config
    return CoreInfo(model=mc.model, max_model_len=sc.max_model_len, vocab_size=mc.vocab_size, block_size=16,
                    num_blocks=1 << 20,
                    max_num_batched_tokens=sc.max_num_batched_tokens, enable_chunked_prefill=True,
                    tokenizer=mc.tokenizer or None, slo_ttft_s=sc.slo_ttft_s, slo_tpot_s=sc.slo_tpot_s)


def _build_fake_core(args: EngineArgs, step_s: float, max_num_seqs: int) -> FakeEngineCore:
    return FakeEngineCore(fake_core_info(args), step_s, max_num_seqs, shed_late=args.slo_shed_late)


def fake_core_factory(step_s: float, max_num_seqs: int = 256) -> partial:
    """A picklable core factory for CoreProcess / ProcessCoreClient (it runs in the spawned core process)."""
    return partial(_build_fake_core, step_s=step_s, max_num_seqs=max_num_seqs)
