"""How a front end talks to an engine core: one Protocol, three ways to hold the core.

- InprocCoreClient: the core in the caller's thread; `get_outputs()` runs one step (offline `LLM`).
- ThreadedCoreClient: the core loop in a background thread of this process (`--engine-in-thread`).
- ProcessCoreClient (core_process.py): the core loop in its own process, messages over ZeroMQ (the server's
  default: the step loop never shares a GIL with HTTP work).

The front ends (LLMEngine, AsyncLLM) are written against `EngineCoreClient` only.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from meshserve.engine.messages import CoreInfo, EngineCoreOutputs, EngineCoreRequest
from meshserve.errors import EngineDeadError

if TYPE_CHECKING:  # not at run time: the server spawns its core process before torch is imported
    from meshserve.engine.core import EngineCore

logger = logging.getLogger(__name__)

# Commands of the core loop, as tuples: (ADD, EngineCoreRequest), (ABORT, [ids]), (CALL, fn, future), (SHUTDOWN,)
ADD, ABORT, CALL, SHUTDOWN = "add", "abort", "call", "shutdown"

# How long an idle core waits for a command before looking around again (liveness checks).
IDLE_POLL_S = 0.5


@runtime_checkable
class EngineCoreClient(Protocol):
    """The front end's handle on a core. add/abort never block on a step; outputs come from get_outputs."""

    info: CoreInfo

    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request (an in-process core raises refusals here; others report them in the outputs)."""

    def abort_requests(self, request_ids: list[str]) -> None:
        """Stop requests; unknown or finished ids are ignored."""

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        """The next step's outputs; None if none came within timeout. Raises EngineDeadError once the core
        is gone."""

    def is_alive(self) -> bool: ...

    def shutdown(self) -> None: ...


def run_core_loop(core: EngineCore, next_command: Callable[[float], tuple | None],
                  publish: Callable[[EngineCoreOutputs], None]) -> None:
    """Take every queued command, step while there is work, publish each step's outputs; return on SHUTDOWN.

    next_command(timeout) returns the next command, or None when none came within timeout (0: don't wait).
    A core with nothing to run waits for commands; after taking some it publishes its refusals and counters
    at once, before the next step, so the front end's view (queue depth, /metrics) never waits on a step.
    """
    while True:
        handled = False
        timeout = 0.0 if core.has_unfinished_requests() else IDLE_POLL_S
        while (cmd := next_command(timeout)) is not None:
            timeout = 0.0
            handled = True
            kind = cmd[0]
            if kind == ADD:
                core.add_request_or_report(cmd[1])
            elif kind == ABORT:
                core.abort_requests(cmd[1])
            elif kind == CALL:
                _run_call(cmd[1], cmd[2])
            elif kind == SHUTDOWN:
                core.shutdown()
                return
        if handled:  # refusals and the new counters go out now, not after a step that may take a while
            publish(core.idle_outputs())
        if core.has_unfinished_requests():
            publish(core.step())


def _run_call(fn: Callable, fut: concurrent.futures.Future) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as e:
        fut.set_exception(e)


class InprocCoreClient:
    """The core in the caller's thread: nothing runs between calls, and get_outputs() is one step."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.info = core.info

    def add_request(self, request: EngineCoreRequest) -> None:
        self.core.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.core.abort_requests(request_ids)

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs:
        if self.core.has_unfinished_requests():
            return self.core.step()
        return self.core.idle_outputs()

    def is_alive(self) -> bool:
        return self.core is not None

    def shutdown(self) -> None:
        if self.core is not None:
            self.core.shutdown()
            self.core = None


_DEAD = object()


class ThreadedCoreClient:
    """The core loop in a daemon thread of this process; commands and outputs pass through queues."""

    def __init__(self, core: EngineCore):
        self.core = core
        self.info = core.info
        self._commands: queue.Queue = queue.Queue()
        self._outputs: queue.Queue = queue.Queue()
        self._dead: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="meshserve-engine-core", daemon=True)
        self._thread.start()

    def _next_command(self, timeout: float) -> tuple | None:
        try:
            return self._commands.get(block=timeout > 0, timeout=timeout if timeout > 0 else None)
        except queue.Empty:
            return None

    def _main(self) -> None:
        try:
            run_core_loop(self.core, self._next_command, self._outputs.put)
        except BaseException as e:  # the core is broken: fail every caller, never hang them
            logger.exception("engine core loop died")
            self._dead = e
            self._outputs.put(_DEAD)
            while True:  # answer queued calls so no caller waits forever
                try:
                    cmd = self._commands.get_nowait()
                except queue.Empty:
                    break
                if cmd[0] == CALL and cmd[2].set_running_or_notify_cancel():
                    cmd[2].set_exception(EngineDeadError(f"engine core died: {e}"))

    def _send(self, cmd: tuple) -> None:
        if not self.is_alive():
            raise EngineDeadError("the engine is not running")
        self._commands.put(cmd)

    def add_request(self, request: EngineCoreRequest) -> None:
        self._send((ADD, request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.is_alive():
            self._commands.put((ABORT, list(request_ids)))

    def call(self, fn: Callable) -> concurrent.futures.Future:
        """Run fn() on the core's thread between steps (to read its state consistently)."""
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._send((CALL, fn, fut))
        return fut

    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        try:
            item = self._outputs.get(timeout=timeout)
        except queue.Empty:
            if not self._thread.is_alive() and self._dead is None:
                raise EngineDeadError("the engine core thread is gone") from None
            return None
        if item is _DEAD:
            self._outputs.put(_DEAD)  # every later reader learns it too
            raise EngineDeadError(f"engine core died: {self._dead}")
        return item

    def is_alive(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._commands.put((SHUTDOWN,))
            self._thread.join(timeout)
        self._outputs.put(None)  # "nothing came": a reader blocked in get_outputs wakes now, not at its timeout
