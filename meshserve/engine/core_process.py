"""The engine core in its own process, so the step loop never shares a GIL with HTTP work.

`ProcessAsyncLLM` offers the same interface as the in-thread `AsyncLLM` (generate, abort, stats, tokenizer,
max_model_len, num_waiting, call, shutdown). The child process runs Engine.step() in a loop; requests and
aborts go in through one queue, RequestOutputs come back through another, once per step for all requests
that changed. The parent keeps its own tokenizer for chat templates and echo, used from one worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing as mp
import queue
import signal
import threading
import uuid

from meshserve.config import EngineArgs
from meshserve.errors import EngineDeadError, InvalidArgumentError, MeshserveError
from meshserve.engine.output_streams import OutputStreams

logger = logging.getLogger(__name__)


# -- the child ---------------------------------------------------------------------------------------
def _portable_error(e: BaseException) -> tuple:
    """Exceptions cross the pipe as (class, message, param): custom __init__ signatures do not unpickle."""
    cls = type(e) if isinstance(e, MeshserveError) else MeshserveError
    return cls, str(e), getattr(e, "param", None)


def _rebuild_error(cls, message: str, param) -> BaseException:
    if issubclass(cls, InvalidArgumentError):
        return cls(message, param=param)
    return cls(message)


def _core_main(args: EngineArgs, inbox: mp.Queue, outbox: mp.Queue) -> None:
    from meshserve.distributed.worker import _die_with_parent
    from meshserve.engine.engine import Engine

    _die_with_parent()
    # the parent owns the lifecycle (drain on SIGTERM, Ctrl-C): it tells the core when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        engine = Engine.from_engine_args(args)
    except BaseException as e:  # report why the model could not load, then leave
        outbox.put(("failed", _portable_error(e)))
        return
    outbox.put(("ready", {"max_model_len": engine.config.scheduler_config.max_model_len,
                          "tokenizer": engine.config.model_config.tokenizer or None}))
    try:
        while True:
            idle = not engine.has_unfinished_requests()
            try:
                while True:  # take every queued command before the next step
                    cmd = inbox.get(block=idle, timeout=0.5 if idle else None)
                    idle = False
                    kind = cmd[0]
                    if kind == "shutdown":
                        engine.shutdown()
                        return
                    if kind == "add":
                        _, rid, prompt, params = cmd
                        try:
                            engine.add_request(rid, prompt, params)
                        except Exception as e:
                            outbox.put(("error", rid, _portable_error(e)))
                    elif kind == "abort":
                        engine.abort_request(cmd[1])
                    elif kind == "stats":
                        outbox.put(("stats", cmd[1], engine.stats()))
            except queue.Empty:
                pass
            if engine.has_unfinished_requests():
                outs = engine.step()
                outbox.put(("outputs", outs, engine.scheduler.num_waiting))
    except BaseException as e:
        logger.exception("engine core died")
        outbox.put(("dead", _portable_error(e)))


# -- the parent --------------------------------------------------------------------------------------
class ProcessAsyncLLM(OutputStreams):
    """AsyncLLM whose engine runs in a child process."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 1800.0):
        super().__init__()
        ctx = mp.get_context("spawn")
        self._inbox: mp.Queue = ctx.Queue()
        self._outbox: mp.Queue = ctx.Queue()
        # not a daemon: the core may spawn tensor/pipeline-parallel workers of its own
        self._proc = ctx.Process(target=_core_main, args=(args, self._inbox, self._outbox),
                                 name="meshserve-engine-core")
        self._proc.start()
        msg = self._wait_ready(startup_timeout_s)
        self._max_model_len = msg["max_model_len"]
        self.tokenizer = None
        if msg["tokenizer"]:
            from meshserve.engine.engine import load_tokenizer

            self.tokenizer = load_tokenizer(msg["tokenizer"])
        self._num_waiting = 0
        self._stats: dict[str, concurrent.futures.Future] = {}
        self._dead: BaseException | None = None
        # the parent's tokenizer is used from this one thread only (Rust tokenizers are not re-entrant)
        self._tokenizer_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="meshserve-tok")
        self._reader = threading.Thread(target=self._read, name="meshserve-core-reader", daemon=True)
        self._reader.start()

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> "ProcessAsyncLLM":
        return cls(args)

    def _wait_ready(self, timeout_s: float) -> dict:
        while True:
            try:
                msg = self._outbox.get(timeout=1.0)
            except queue.Empty:
                if not self._proc.is_alive():
                    raise EngineDeadError(f"the engine process exited with code {self._proc.exitcode} "
                                          "while loading the model") from None
                timeout_s -= 1.0
                if timeout_s <= 0:
                    self._proc.kill()
                    raise EngineDeadError("the engine process did not become ready in time") from None
                continue
            if msg[0] == "failed":
                self._proc.join(10)
                raise _rebuild_error(*msg[1])
            return msg[1]

    # -- state -----------------------------------------------------------------------------------
    @property
    def is_running(self) -> bool:
        return self._dead is None and self._proc.is_alive()

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    # -- reader thread ---------------------------------------------------------------------------
    def _fail_all(self, error: BaseException) -> None:
        self._dead = error
        for rid in list(self._streams):
            self._deliver(rid, error)
        for fut in list(self._stats.values()):
            if not fut.done():
                fut.set_exception(error)

    def _read(self) -> None:
        while True:
            try:
                msg = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if not self._proc.is_alive():
                    self._fail_all(EngineDeadError(f"the engine process exited (code {self._proc.exitcode})"))
                    return
                continue
            except (EOFError, OSError):
                self._fail_all(EngineDeadError("the engine process is gone"))
                return
            kind = msg[0]
            if kind == "outputs":
                _, outs, self._num_waiting = msg
                for out in outs:
                    self._deliver(out.request_id, out)
            elif kind == "error":
                self._deliver(msg[1], _rebuild_error(*msg[2]))
            elif kind == "stats":
                fut = self._stats.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2])
            elif kind == "dead":
                self._fail_all(EngineDeadError(f"engine core died: {msg[1][1]}"))
                return

    # -- caller side -----------------------------------------------------------------------------
    def _send(self, *cmd) -> None:
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        self._inbox.put(cmd)

    async def _start(self, request_id: str, prompt, params) -> None:
        self._send("add", request_id, prompt, params)  # rejections come back as exceptions in the stream

    def _abort_nowait(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> bool:
        self._send("abort", request_id)
        return True

    async def stats(self) -> dict:
        token = uuid.uuid4().hex
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._stats[token] = fut
        self._send("stats", token)
        try:
            return await asyncio.wrap_future(fut)
        finally:
            self._stats.pop(token, None)

    async def call(self, fn):
        """Run fn() on the tokenizer thread of this process (chat templates, echo decoding)."""
        return await asyncio.wrap_future(self._tokenizer_thread.submit(fn))

    def shutdown(self, timeout: float = 30.0) -> None:
        if self._proc.is_alive():
            self._inbox.put(("shutdown",))
            self._proc.join(timeout)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._tokenizer_thread.shutdown(wait=False)
        self._dead = self._dead or EngineDeadError("the engine was shut down")

