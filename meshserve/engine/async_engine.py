"""AsyncLLM: the engine loop in a background thread, streaming RequestOutputs to asyncio callers.

The server awaits `generate(...)` per request; leaving the iterator early (client gone, task cancelled)
aborts the request, so its KV blocks are free by the next step. The engine thread only ever touches the
Engine; callers talk to it through a command queue, so no lock is held across a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading

from meshserve.config import EngineArgs
from meshserve.engine.engine import Engine
from meshserve.engine.output_streams import OutputStreams
from meshserve.errors import EngineDeadError

logger = logging.getLogger(__name__)

_STOP = object()


class AsyncLLM(OutputStreams):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="meshserve-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "AsyncLLM":
        return cls(Engine.from_engine_args(args))

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    @property
    def max_model_len(self) -> int:
        return self.engine.config.scheduler_config.max_model_len

    @property
    def num_waiting(self) -> int:
        """Requests queued in the scheduler (a racy read: exact enough for admission control)."""
        return self.engine.scheduler.num_waiting

    async def stats(self) -> dict:
        return await self.call(self.engine.stats)

    # -- engine thread ---------------------------------------------------------------------------
    def _run_command(self, cmd) -> bool:
        if cmd is _STOP:
            return False
        kind, args, fut = cmd
        if not fut.set_running_or_notify_cancel():
            return True  # the caller was cancelled (client gone) before the engine got to it
        try:
            if kind == "add":
                fut.set_result(self.engine.add_request(*args))
            elif kind == "abort":
                fut.set_result(self.engine.abort_request(*args))
            elif kind == "call":
                fut.set_result(args[0]())
        except BaseException as e:  # validation errors go back to the caller
            fut.set_exception(e)
        return True

    def _loop(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished_requests()
                try:
                    while True:
                        cmd = self._commands.get(block=block, timeout=0.5 if block else None)
                        if not self._run_command(cmd):
                            return
                        block = False
                except queue.Empty:
                    pass
                if self.engine.has_unfinished_requests():
                    for out in self.engine.step():
                        self._deliver(out.request_id, out)
        except BaseException as e:  # the engine is broken: fail every caller, never hang them
            logger.exception("engine loop died")
            self._dead = e
            for rid in list(self._streams):
                self._deliver(rid, EngineDeadError(f"engine loop died: {e}"))
            while True:  # answer queued commands so no caller waits forever
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd is not _STOP and cmd[2].set_running_or_notify_cancel():
                    cmd[2].set_exception(EngineDeadError(f"engine loop died: {e}"))

    # -- caller side -----------------------------------------------------------------------------
    async def _submit(self, kind: str, *args):
        if self._dead is not None or not self._thread.is_alive():
            raise EngineDeadError("the engine is not running")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((kind, args, fut))
        return await asyncio.wrap_future(fut)

    async def call(self, fn):
        """Run fn() on the engine thread between steps (e.g. to read stats consistently)."""
        return await self._submit("call", fn)

    async def _start(self, request_id: str, prompt, params) -> None:
        await self._submit("add", request_id, prompt, params)

    def _abort_nowait(self, request_id: str) -> None:
        self._commands.put(("abort", (request_id,), concurrent.futures.Future()))

    async def abort(self, request_id: str) -> bool:
        return await self._submit("abort", request_id)

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put(_STOP)
            self._thread.join(timeout)
