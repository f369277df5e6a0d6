"""LLMEngine: the synchronous front end (offline `LLM`): input processing, a core client, output processing.

One thread drives it: add_request() validates and tokenizes here, step() runs one core step (in this thread,
with the default in-process core) and turns its deltas into RequestOutputs, aborting in the core the
requests a stop string ended.
"""

from __future__ import annotations

import itertools
import logging

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.core_client import EngineCoreClient, InprocCoreClient
from meshserve.engine.input_processor import InputProcessor, PromptType
from meshserve.engine.messages import error_from_message
from meshserve.engine.output_processor import OutputProcessor
from meshserve.outputs import RequestOutput
from meshserve.sampling import SamplingParams

logger = logging.getLogger(__name__)


class LLMEngine:
    """Requests in, RequestOutputs out, one step at a time. Not thread-safe."""

    def __init__(self, core_client: EngineCoreClient, tokenizer=None):
        self.core_client = core_client
        self.tokenizer = tokenizer
        self.input_processor = InputProcessor(core_client.info, tokenizer)
        self.output_processor = OutputProcessor(tokenizer)
        self._ids = itertools.count()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        from meshserve.engine.early_tokenizer import EarlyTokenizer, tokenizer_dir_of

        if args.model is None or tokenizer_dir_of(args) is not None:
            # a tokenizer loads on a thread beside the core: imported here, so no two threads import
            # transformers at once (the core's config may still need it: models/hf_config.py). With none to
            # load early (presets, dummy configs) nothing here needs transformers: its ~2 s stay off the start
            import transformers.models.auto.tokenization_auto  # noqa: F401
        tokenizer = EarlyTokenizer(args)  # loads while the core loads the model
        core = EngineCore.from_engine_args(args)
        return cls(InprocCoreClient(core), tokenizer.load(core.info.tokenizer))

    # -- the in-process core, for tools and tests that look inside --------------------------------
    @property
    def core(self) -> EngineCore:
        return self.core_client.core  # type: ignore[attr-defined]

    @property
    def config(self):
        return self.core.config

    @property
    def scheduler(self):
        return self.core.scheduler

    @property
    def executor(self):
        return self.core.executor

    @property
    def runner(self):
        return self.core.runner

    @property
    def async_scheduling(self) -> bool:
        return self.core.async_scheduling

    def stats(self) -> dict:
        return self.core.stats()

    # -- requests --------------------------------------------------------------------------------
    def next_request_id(self) -> str:
        return str(next(self._ids))

    def add_request(self, request_id: str | None, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None, priority: int = 0) -> str:
        """Validate, tokenize and queue a request; raises InvalidArgumentError / PromptTooLongError."""
        request_id = request_id if request_id is not None else self.next_request_id()
        processed = self.input_processor.process(request_id, prompt, params, arrival_time, priority)
        self.output_processor.add_request(processed)
        try:
            for req in processed.core_requests:
                self.core_client.add_request(req)
        except BaseException:
            self.abort_request(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> bool:
        """Stop a request now; its KV blocks return to the pool. False if it is unknown or done."""
        known = request_id in self.output_processor.requests
        self.core_client.abort_requests(self.output_processor.abort_request(request_id))
        return known

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished_requests()

    @property
    def requests(self) -> dict:
        """Unfinished requests by id (front-end state)."""
        return self.output_processor.requests

    # -- the step --------------------------------------------------------------------------------
    def step(self, finished_only: bool = False) -> list[RequestOutput]:
        """One core step; returns the requests that changed (or, with finished_only, just those that
        finished: offline batches need no per-step snapshots)."""
        core_outputs = self.core_client.get_outputs()
        if core_outputs is None:
            return []
        for err in core_outputs.errors:  # an in-process core raises at add_request; others report here
            state = self.output_processor.request_of(err.request_id)
            if state is not None:
                self.abort_request(state.request_id)
                raise error_from_message(err)
        processed = self.output_processor.process_outputs(core_outputs, finished_only)
        self.core_client.abort_requests(processed.requests_to_abort)
        return processed.request_outputs

    def shutdown(self) -> None:
        self.core_client.shutdown()
