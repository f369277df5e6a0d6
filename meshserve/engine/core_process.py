"""The engine core in its own process, so the step loop never shares a GIL with HTTP work.

Two ZeroMQ PUSH/PULL pipes over ipc sockets carry msgpack-encoded messages (msgspec): requests and aborts go
in, one `EngineCoreOutputs` per step comes out (deltas only: a few bytes per running request). Each message is
two frames, its kind and its payload. The child reports "ready" with its CoreInfo (or "failed" with why the
model could not load) before serving.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import signal
import sys
import tempfile
import threading
import time

import msgspec
import zmq

from meshserve.config import EngineArgs
from meshserve.engine.core_client import ABORT, ADD, IDLE_POLL_S, SHUTDOWN, run_core_loop
from meshserve.engine.messages import (
    CoreInfo,
    EngineCoreOutputs,
    EngineCoreRequest,
    RequestError,
    error_from_message,
    error_to_message,
)
from meshserve.errors import EngineDeadError

logger = logging.getLogger(__name__)

# frame 0 of every message
_ADD, _ABORT, _SHUTDOWN = b"add", b"abort", b"shutdown"
_OUTPUTS, _READY, _FAILED, _DEAD = b"outputs", b"ready", b"failed", b"dead"

_encoder = msgspec.msgpack.Encoder()


# -- the child ---------------------------------------------------------------------------------------
def _core_main(args: EngineArgs, input_addr: str, output_addr: str, log_level: int = logging.WARNING) -> None:
    from meshserve.distributed.launch import die_with_parent
    from meshserve.engine.core import EngineCore

    die_with_parent()
    # log like the parent (a spawned process starts with no logging set up); stderr is the parent's terminal
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshserve").setLevel(log_level)
    # the parent owns the lifecycle (drain on SIGTERM, Ctrl-C): it tells the core when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.setsockopt(zmq.LINGER, 5000)  # a last "dead" message still leaves
    outbox.connect(output_addr)
    try:
        core = EngineCore.from_engine_args(args)
    except BaseException as e:  # report why the model could not load, then leave
        outbox.send_multipart([_FAILED, _encoder.encode(error_to_message("", e))])
        inbox.close(linger=0)
        outbox.close()  # lingers until the message is out
        ctx.term()
        return
    outbox.send_multipart([_READY, _encoder.encode(core.info)])
    request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
    ids_decoder = msgspec.msgpack.Decoder(list[str])

    def next_command(timeout: float) -> tuple | None:
        if not inbox.poll(int(timeout * 1000)):
            return None
        kind, payload = inbox.recv_multipart(copy=False)
        kind = kind.bytes
        if kind == _ADD:
            return ADD, request_decoder.decode(payload.buffer)
        if kind == _ABORT:
            return ABORT, ids_decoder.decode(payload.buffer)
        return (SHUTDOWN,)

    def publish(outputs: EngineCoreOutputs) -> None:
        outbox.send_multipart([_OUTPUTS, _encoder.encode(outputs)], copy=False)

    try:
        run_core_loop(core, next_command, publish)
    except BaseException as e:
        logger.exception("engine core died")
        outbox.send_multipart([_DEAD, _encoder.encode(error_to_message("", e))])
    finally:
        inbox.close(linger=0)
        outbox.close()
        ctx.term()


# -- the parent --------------------------------------------------------------------------------------
class ProcessCoreClient:
    """An EngineCoreClient whose core runs in a child process."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 1800.0):
        self._ctx = zmq.Context()
        self._dir = tempfile.mkdtemp(prefix="meshserve-core-")
        input_addr, output_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        self._inbox = self._ctx.socket(zmq.PUSH)  # to the core
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.bind(input_addr)
        self._outbox = self._ctx.socket(zmq.PULL)  # from the core
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.bind(output_addr)
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; several threads send
        self._recv_lock = threading.Lock()  # held by the reader while it polls; shutdown takes it to close
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._error_decoder = msgspec.msgpack.Decoder(RequestError)
        self._dead: BaseException | None = None
        ctx = mp.get_context("spawn")
        # not a daemon: the core may spawn tensor/pipeline-parallel workers of its own
        log_level = logging.getLogger("meshserve").getEffectiveLevel()
        self.proc = ctx.Process(target=_core_main, args=(args, input_addr, output_addr, log_level),
                                name="meshserve-engine-core")
        self.proc.start()
        try:
            self.info: CoreInfo = self._wait_ready(startup_timeout_s)
        except BaseException:  # a failed load, or Ctrl-C while loading: no core may outlive this
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
            self._close_sockets()
            raise

    def _wait_ready(self, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while not self._outbox.poll(1000):
            if not self.proc.is_alive():
                raise EngineDeadError(f"the engine process exited with code {self.proc.exitcode} "
                                      "while loading the model")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise EngineDeadError("the engine process did not become ready in time")
        kind, payload = self._outbox.recv_multipart()
        if kind == _FAILED:
            self.proc.join(10)
            if self.proc.is_alive():  # it said why; it need not be waited for any longer
                self.proc.kill()
                self.proc.join(5)
            raise error_from_message(self._error_decoder.decode(payload))
        return msgspec.msgpack.decode(payload, type=CoreInfo)

    # -- commands --------------------------------------------------------------------------------
    def _send(self, kind: bytes, payload: bytes) -> None:
        with self._send_lock:
            self._inbox.send_multipart([kind, payload])

    def add_request(self, request: EngineCoreRequest) -> None:
        if not self.is_alive():
            raise EngineDeadError("the engine is not running")
        self._send(_ADD, _encoder.encode(request))

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids and self.is_alive():
            self._send(_ABORT, _encoder.encode(list(request_ids)))

    # -- outputs (one reader thread) -------------------------------------------------------------
    def get_outputs(self, timeout: float | None = None) -> EngineCoreOutputs | None:
        with self._recv_lock:
            return self._get_outputs(timeout)

    def _get_outputs(self, timeout: float | None) -> EngineCoreOutputs | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._dead is not None:
                raise self._dead
            wait = IDLE_POLL_S if deadline is None else max(0.0, min(IDLE_POLL_S, deadline - time.monotonic()))
            if self._outbox.poll(int(1000 * wait)):
                break
            if not self.proc.is_alive():
                self._dead = EngineDeadError(f"the engine process exited (code {self.proc.exitcode})")
            elif deadline is not None and time.monotonic() >= deadline:
                return None
        kind, payload = self._outbox.recv_multipart(copy=False)
        if kind.bytes == _OUTPUTS:
            return self._outputs_decoder.decode(payload.buffer)
        err = self._error_decoder.decode(payload.buffer)
        self._dead = EngineDeadError(f"engine core died: {err.message}")
        raise self._dead

    def is_alive(self) -> bool:
        return self._dead is None and self.proc.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.proc.is_alive():
            try:
                self._send(_SHUTDOWN, b"")
            except zmq.ZMQError:
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._dead = self._dead or EngineDeadError("the engine was shut down")
        self._close_sockets()

    def _close_sockets(self) -> None:
        with self._send_lock:
            if not self._inbox.closed:
                self._inbox.close(linger=0)
        with self._recv_lock:  # a reader sees the core gone within one poll and lets go
            if not self._outbox.closed:
                self._outbox.close(linger=0)
        self._ctx.term()
        for name in ("in", "out"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass
