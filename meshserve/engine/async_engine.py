"""AsyncLLM: the asyncio front end. Streams RequestOutputs to asyncio callers from a core in a thread or process.

The caller's side validates and tokenizes (text prompts on one tokenizer thread), registers the request
with the OutputProcessor and sends it to the core. One output thread takes each step's EngineCoreOutputs,
turns them into RequestOutputs (detokenization and stop strings run here, never in the core), aborts in
the core what a stop string ended, and hands each event loop its outputs in one wake-up per step. The
core's counters arrive with every step, so reading them never waits on the core.

Leaving `generate()` early (client gone, task cancelled) aborts the request, so its KV blocks are free by
the core's next step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec

from meshserve.config import EngineArgs
from meshserve.engine.admission_margin import AdmissionMargin
from meshserve.engine.core_client import EngineCoreClient
from meshserve.engine.input_processor import InputProcessor, PromptType, load_tokenizer
from meshserve.engine.messages import EngineCoreOutputs, SchedulerStats, error_from_message
from meshserve.engine.output_coalescing import fold_outputs
from meshserve.engine.output_processor import OutputProcessor
from meshserve.errors import EngineDeadError, ServiceLevelError
from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams

logger = logging.getLogger(__name__)

# How often the output thread looks up from an idle core (to notice shutdown).
_OUTPUT_POLL_S = 0.5


def _put_all(items: list[tuple[asyncio.Queue, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncLLM:
    """An engine for asyncio callers: `generate()` per request, over any EngineCoreClient."""

    def __init__(self, core_client: EngineCoreClient, tokenizer=None, output_tokenizer=None):
        """output_tokenizer: the output processor's own copy of tokenizer where the caller made one ahead
        (EarlyTokenizer.copy_of); else it is copied here."""
        self.core_client = core_client
        self.tokenizer = tokenizer  # the input side's; the output processor holds its own copy
        self.input_processor = InputProcessor(core_client.info, tokenizer)
        self.output_processor = OutputProcessor(tokenizer, output_tokenizer)
        self._lock = threading.Lock()  # the output processor, between callers and the output thread
        self._dead: BaseException | None = None
        self._closing = False
        self._stats = SchedulerStats(num_blocks=core_client.info.num_blocks)
        self._stats_time = time.monotonic()
        # delay a request will still meet in the caller's process after this check (the server sets it: its
        # event loop's lag, i.e. how late a first token leaves once made)
        self.frontend_delay_s: Callable[[], float] = lambda: 0.0
        # a request with a TTFT target is admitted while its predicted TTFT is under this fraction of it,
        # adapted to how late admitted requests' first tokens really came (admission_margin.py)
        self.admission_margin = AdmissionMargin()
        # prompts and chat templates are tokenized on this one thread (Rust tokenizers are not re-entrant)
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshserve-tok")
        self._output_thread = threading.Thread(target=self._pump_outputs, name="meshserve-outputs", daemon=True)
        self._output_thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs, separate_process: bool = False,
                         core_factory: Callable | None = None, core_process=None,
                         tokenizer_loader: Callable = load_tokenizer,
                         tokenizer_copier: Callable | None = None) -> AsyncLLM:
        """The core in a thread of this process, or (separate_process) in a child process of its own;
        core_factory(args) builds a stand-in core there (the front-end benchmark's model-less core);
        core_process: that child, already spawned (CoreProcess(wait=False)); tokenizer_loader(the core's
        tokenizer folder): the tokenizer (an EarlyTokenizer's load hands over one loaded meanwhile);
        tokenizer_copier(tokenizer): the output processor's copy of it (EarlyTokenizer.copy_of: one made
        meanwhile too)."""
        if separate_process:
            from meshserve.engine.core_process import ProcessCoreClient

            client: EngineCoreClient = ProcessCoreClient(args, core_factory=core_factory, core_process=core_process)
        else:
            from meshserve.engine.core import EngineCore
            from meshserve.engine.core_client import ThreadedCoreClient

            client = ThreadedCoreClient(EngineCore.from_engine_args(args))
        try:
            tokenizer = tokenizer_loader(client.info.tokenizer)
            output_tokenizer = tokenizer_copier(tokenizer) if tokenizer_copier and tokenizer is not None else None
            return cls(client, tokenizer, output_tokenizer)
        except BaseException:
            client.shutdown()
            raise

    # -- state -----------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._dead is None and not self._closing and self.core_client.is_alive()

    @property
    def max_model_len(self) -> int:
        return self.core_client.info.max_model_len

    @property
    def num_waiting(self) -> int:
        """Requests waiting to run: queued in the core as of its last message, or sent to it since (the core
        takes new requests between steps, so during a long step they wait here)."""
        st = self._stats
        return max(st.num_waiting, self.output_processor.num_running_completions() - st.num_running)

    def stats_snapshot(self) -> tuple[dict, float]:
        """The core's counters as of its last message (waiting including requests sent since), and their age
        in seconds."""
        stats = msgspec.structs.asdict(self._stats)
        stats["num_waiting"] = self.num_waiting
        per_core = getattr(self.core_client, "per_core_stats", None)  # data parallel: each core's own, too
        if per_core is not None:
            stats["engines"] = [msgspec.structs.asdict(st) for st in per_core()]
        return stats, time.monotonic() - self._stats_time

    async def stats(self) -> dict:
        return self.stats_snapshot()[0]

    @property
    def engine(self):
        """The EngineCore itself when it runs in a thread of this process (tests and tools look inside)."""
        return self.core_client.core  # type: ignore[attr-defined]

    async def call(self, fn: Callable):
        """Run fn() on the core's thread between steps (a core in a thread of this process only)."""
        return await asyncio.wrap_future(self.core_client.call(fn))  # type: ignore[attr-defined]

    async def run_tokenizer(self, fn: Callable):
        """Run fn() on the tokenizer thread (chat templates, prompt encoding, echo decoding)."""
        return await asyncio.wrap_future(self._tokenizer_thread.submit(fn))

    # -- requests --------------------------------------------------------------------------------
    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0, slo_ttft_s: float | None = None,
                       slo_tpot_s: float | None = None, arrival_time: float | None = None,
                       ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs (of params.output_kind; cumulative by default), the last one
        finished. Invalid requests raise on the first iteration, and so does a request whose time to
        first token is predicted to break its target (ServiceLevelError, at once). Leaving early aborts
        the request. priority and the slo_* targets: see InputProcessor.process. arrival_time
        (time.monotonic(), default now): when the request reached the server, so time spent before this
        call counts against its time-to-first-token target."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or f"req-{uuid.uuid4().hex}"

        def process():
            return self.input_processor.process(request_id, prompt, params, arrival_time, priority, slo_ttft_s,
                                                slo_tpot_s)

        processed = await self.run_tokenizer(process) if InputProcessor.needs_tokenizer(prompt) else process()
        predicted = self._check_service_level(processed.slo_ttft_s, len(processed.prompt_token_ids),
                                              processed.arrival_time)
        q: asyncio.Queue = asyncio.Queue()
        with self._lock:
            self.output_processor.add_request(processed, queue=(asyncio.get_running_loop(), q))
        finished = False
        try:
            for req in processed.core_requests:
                self.core_client.add_request(req)
            kind = processed.params.output_kind
            while True:
                item = await q.get()
                while not isinstance(item, BaseException) and not item.finished and not q.empty():
                    nxt = q.get_nowait()  # the caller lags: what piled up goes out as one output
                    item = nxt if isinstance(nxt, BaseException) else fold_outputs(item, nxt, kind)
                if isinstance(item, BaseException):
                    raise item
                if predicted is not None:  # its first output: how late it came against the prediction
                    self.admission_margin.observe(predicted, time.monotonic() - processed.arrival_time,
                                                  processed.slo_ttft_s)
                    predicted = None
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort(request_id)

    def predicted_ttft_s(self, num_prompt_tokens: int, arrival_time: float | None = None) -> float:
        """Time to first token of a request that arrived at arrival_time (default: now), from the core's last
        published queue state."""
        st = self._stats
        waited = time.monotonic() - arrival_time if arrival_time is not None else 0.0
        return waited + st.queue_wait_s + num_prompt_tokens * st.prefill_s_per_token + self.frontend_delay_s()

    def _check_service_level(self, ttft_target_s: float | None, num_prompt_tokens: int,
                             arrival_time: float | None = None) -> float | None:
        """The request's predicted TTFT (None without a target); raises ServiceLevelError past the margin."""
        if ttft_target_s is None:
            return None
        predicted = self.predicted_ttft_s(num_prompt_tokens, arrival_time)
        if not self.admission_margin.admits(predicted, ttft_target_s):
            raise ServiceLevelError(
                f"the server is at capacity: predicted time to first token {predicted:.2f} s, target "
                f"{ttft_target_s:.2f} s (admitting to {self.admission_margin.value:.2f} of it); retry later",
                retry_after_s=max(1, round(predicted - ttft_target_s)))
        return predicted

    def _abort(self, request_id: str) -> None:
        with self._lock:
            running = self.output_processor.abort_request(request_id)
        if self.is_running:
            self.core_client.abort_requests(running)

    async def abort(self, request_id: str) -> bool:
        known = request_id in self.output_processor.requests
        self._abort(request_id)
        return known

    # -- the output thread -----------------------------------------------------------------------
    def _pump_outputs(self) -> None:
        while True:
            try:
                core_outputs = self.core_client.get_outputs(timeout=_OUTPUT_POLL_S)
            except EngineDeadError as e:
                if not self._closing:
                    logger.error("%s", e)
                self._fail_all(e)
                return
            except BaseException as e:  # a broken message must not leave callers waiting forever
                logger.exception("the output thread failed")
                self._fail_all(EngineDeadError(f"the engine's output thread failed: {e}"))
                return
            if core_outputs is None:
                if self._closing:
                    return
                continue
            self._handle(core_outputs)

    def _handle(self, core_outputs: EngineCoreOutputs) -> None:
        if core_outputs.stats is not None:
            self._stats, self._stats_time = core_outputs.stats, time.monotonic()
        deliveries: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        to_abort: list[str] = []
        with self._lock:
            for err in core_outputs.errors:
                state = self.output_processor.request_of(err.request_id)
                if state is not None:
                    to_abort += self.output_processor.abort_request(state.request_id)
                    loop, q = state.queue
                    deliveries.setdefault(loop, []).append((q, error_from_message(err)))
            processed = self.output_processor.process_outputs(core_outputs)
        self.core_client.abort_requests(to_abort + processed.requests_to_abort)
        for out, state in zip(processed.request_outputs, processed.states):
            loop, q = state.queue
            deliveries.setdefault(loop, []).append((q, out))
        for loop, items in deliveries.items():  # one wake-up per event loop per step
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that caller's loop is closed: nobody is waiting
                pass

    def fail_in_flight(self, error: BaseException) -> None:
        """End every request in flight with error (its caller's generate() raises it), aborted in the core;
        the engine goes on serving. A server whose drain ran out of time ends its streams so, in-band."""
        with self._lock:
            states = list(self.output_processor.requests.values())
            running = [rid for state in states
                       for rid in self.output_processor.abort_request(state.request_id)]
        if self.is_running:
            self.core_client.abort_requests(running)
        self._hand_out(states, error)

    def _fail_all(self, error: BaseException) -> None:
        self._dead = error
        with self._lock:
            states = list(self.output_processor.requests.values())
            for state in states:
                self.output_processor.abort_request(state.request_id)
        self._hand_out(states, error)

    @staticmethod
    def _hand_out(states: list, error: BaseException) -> None:
        for state in states:
            loop, q = state.queue
            try:
                loop.call_soon_threadsafe(q.put_nowait, error)
            except RuntimeError:
                pass

    def shutdown(self, timeout: float = 30.0) -> None:
        self._closing = True
        self.core_client.shutdown()
        if self._output_thread is not threading.current_thread():
            self._output_thread.join(timeout)
        self._tokenizer_thread.shutdown(wait=False)
