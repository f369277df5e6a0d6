"""The engine core in its own process, so the step loop never shares a GIL with HTTP work.

The core binds two ZeroMQ sockets on ipc paths and any number of front ends (API server processes,
`--api-server-count`) connect to them:
- inbox (PULL): requests and aborts, as [kind, client id, msgpack payload] (msgspec);
- outbox (ROUTER): each front end's DEALER says hello under its own identity, gets the CoreInfo back, then one
  `EngineCoreOutputs` per step holding only its own requests' deltas (a few bytes per running request), the
  refusals of its requests and the core's counters (everyone gets those).
The process that starts the core (`CoreProcess`) learns over a pipe whether the model loaded, and alone tells
the core to stop. `ProcessCoreClient` is that owner and a front end in one (the one-process server).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
import zmq

from meshserve.config import EngineArgs
from meshserve.distributed import process_start
from meshserve.engine import startup_timeline
from meshserve.engine.core_client import ABORT, ADD, IDLE_POLL_S, SHUTDOWN, run_core_loop
from meshserve.engine.core_timing import attach_from_env as attach_core_timing
from meshserve.engine.heap import (
    freeze_startup_heap,
    set_young_collection_threshold,
    young_collection_threshold,
)
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

# frame 0 of every message (after the ROUTER's identity frame)
_ADD, _ABORT, _SHUTDOWN, _HELLO = b"add", b"abort", b"shutdown", b"hello"
_OUTPUTS, _READY, _FAILED, _DEAD = b"outputs", b"ready", b"failed", b"dead"
OWNER_ID = b"owner"  # the client id of commands from the process that owns the core (shutdown)

_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True)
class CoreAddresses:
    """Where a running core listens, and its pid (front ends in other processes watch it)."""

    input_addr: str
    output_addr: str
    core_pid: int


def pid_alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a front end cannot join a sibling process)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


# -- the child ---------------------------------------------------------------------------------------
class _Router:
    """The core's side of the sockets: commands from every front end, each step's outputs split by front end."""

    def __init__(self, ctx: zmq.Context, input_addr: str, output_addr: str):
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.bind(input_addr)
        self.outbox = ctx.socket(zmq.ROUTER)
        self.outbox.setsockopt(zmq.LINGER, 2000)  # a last "dead" message still leaves
        self.outbox.bind(output_addr)
        self.poller = zmq.Poller()
        self.poller.register(self.inbox, zmq.POLLIN)
        self.poller.register(self.outbox, zmq.POLLIN)
        self.clients: list[bytes] = []  # front ends' identities, in hello order
        self.owner_of: dict[str, bytes] = {}  # request id -> the front end that sent it
        self.info_blob = b""
        self.request_decoder = msgspec.msgpack.Decoder(EngineCoreRequest)
        self.ids_decoder = msgspec.msgpack.Decoder(list[str])

    def next_command(self, timeout: float) -> tuple | None:
        deadline = time.monotonic() + timeout
        while True:
            events = dict(self.poller.poll(int(max(0.0, deadline - time.monotonic()) * 1000)))
            if self.outbox in events:  # a front end says hello: it learns the CoreInfo, the core its identity
                ident, *_ = self.outbox.recv_multipart()
                if ident not in self.clients:
                    self.clients.append(ident)
                self.outbox.send_multipart([ident, _READY, self.info_blob])
            if self.inbox in events:
                kind, client, payload = self.inbox.recv_multipart(copy=False)
                kind = kind.bytes
                if kind == _ADD:
                    request = self.request_decoder.decode(payload.buffer)
                    self.owner_of[request.request_id] = client.bytes
                    return ADD, request
                if kind == _ABORT:
                    ids = self.ids_decoder.decode(payload.buffer)
                    for rid in ids:
                        self.owner_of.pop(rid, None)
                    return ABORT, ids
                return (SHUTDOWN,)
            if time.monotonic() >= deadline:
                return None

    def publish(self, outputs: EngineCoreOutputs) -> None:
        if len(self.clients) == 1:  # one front end: everything is its own
            for out in outputs.outputs:
                if out.finish_reason is not None:
                    self.owner_of.pop(out.request_id, None)
            for err in outputs.errors:
                self.owner_of.pop(err.request_id, None)
            self.outbox.send_multipart([self.clients[0], _OUTPUTS, _encoder.encode(outputs)], copy=False)
            return
        per_client = {ident: EngineCoreOutputs([], [], outputs.stats, outputs.timestamp) for ident in self.clients}
        for out in outputs.outputs:
            owner = self.owner_of.pop(out.request_id, None) if out.finish_reason is not None \
                else self.owner_of.get(out.request_id)
            if owner in per_client:
                per_client[owner].outputs.append(out)
        for err in outputs.errors:
            owner = self.owner_of.pop(err.request_id, None)
            if owner in per_client:
                per_client[owner].errors.append(err)
        for ident, msg in per_client.items():  # counters go to everyone, with or without outputs
            self.outbox.send_multipart([ident, _OUTPUTS, _encoder.encode(msg)], copy=False)

    def tell_all_dead(self, error: BaseException) -> None:
        blob = _encoder.encode(error_to_message("", error))
        for ident in self.clients:
            self.outbox.send_multipart([ident, _DEAD, blob])

    def close(self) -> None:
        self.inbox.close(linger=0)
        self.outbox.close()


def _core_main(args: EngineArgs, input_addr: str, output_addr: str, ready_conn, log_level: int = logging.WARNING,
               core_factory: Callable | None = None) -> None:
    from meshserve.distributed.launch import die_with_parent

    startup_timeline.begin("core")
    die_with_parent()
    # log like the parent (a spawned process starts with no logging set up); stderr is the parent's terminal
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshserve").setLevel(log_level)
    # the parent owns the lifecycle (drain on SIGTERM, Ctrl-C): it tells the core when to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ctx = zmq.Context()
    router = _Router(ctx, input_addr, output_addr)  # bound now: front ends may connect while the model loads
    try:
        if core_factory is None:
            from meshserve.engine.core import EngineCore

            core_factory = EngineCore.from_engine_args
        startup_timeline.mark("imports")
        core = core_factory(args)
    except BaseException as e:  # noqa: BLE001 - report why the model could not load, then leave
        ready_conn.send_bytes(_FAILED + b"\0" + _encoder.encode(error_to_message("", e)))
        router.close()
        ctx.term()
        return
    router.info_blob = _encoder.encode(core.info)
    # the core holds ~300k start-up objects (torch, the model, its graphs): a full collection walking them holds
    # the GIL ~140 ms on a 2-core CPU, a stall of every stream's next token; freeze them (heap.py)
    freeze_startup_heap()
    set_young_collection_threshold(young_collection_threshold())
    ready_conn.send_bytes(_READY + b"\0" + router.info_blob)
    ready_conn.close()
    attach_core_timing(core)  # MESHSERVE_CORE_TIMING: the loop's thread CPU per step (core_timing.py)
    profile = _loop_profiler()
    try:
        run_core_loop(core, router.next_command, router.publish)
    except BaseException as e:
        logger.exception("engine core died")
        router.tell_all_dead(e)
    finally:
        if profile is not None:
            profile()
        router.close()
        ctx.term()


def _loop_profiler() -> Callable[[], None] | None:
    """MESHSERVE_CORE_PROFILE=PATH: cProfile the core loop (every step, intake and publish) from here on, and
    write PATH.<pid>.prof when it ends (the returned call stops and writes). Unset: nothing (None)."""
    path = os.environ.get("MESHSERVE_CORE_PROFILE")
    if not path:
        return None
    import cProfile

    prof = cProfile.Profile()
    prof.enable()

    def stop() -> None:
        prof.disable()
        prof.dump_stats(f"{path}.{os.getpid()}.prof")

    return stop


# -- the owner ---------------------------------------------------------------------------------------
class CoreProcess:
    """Starts the core process, waits until its model is loaded, and stops it (the only one who may).

    wait=False returns as soon as the process is spawned (the server imports its front end while the model
    loads); then wait_ready() must be called, or kill() if the caller gives up first."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 1800.0, core_factory: Callable | None = None,
                 wait: bool = True, env: dict[str, str] | None = None):
        """env: variables the core process (and the ranks it spawns) get on top of this process's, e.g. its
        CUDA_VISIBLE_DEVICES slice under data parallel."""
        self._dir = tempfile.mkdtemp(prefix="meshserve-core-")
        input_addr, output_addr = f"ipc://{self._dir}/in", f"ipc://{self._dir}/out"
        parent_conn, child_conn = process_start.context().Pipe(duplex=False)
        # not a daemon: the core may spawn tensor/pipeline-parallel workers of its own
        log_level = logging.getLogger("meshserve").getEffectiveLevel()
        self.proc = process_start.new_process(_core_main, (args, input_addr, output_addr, child_conn, log_level,
                                                            core_factory), name="meshserve-engine-core", env=env)
        self.proc.start()
        child_conn.close()
        self._zmq = zmq.Context()
        self._control = self._zmq.socket(zmq.PUSH)  # the owner's shutdown command
        self._control.setsockopt(zmq.LINGER, 0)
        self._control.connect(input_addr)
        self.addresses = CoreAddresses(input_addr, output_addr, self.proc.pid)
        self._ready_conn = parent_conn
        self._startup_timeout_s = startup_timeout_s
        self.info: CoreInfo | None = None
        if wait:
            self.wait_ready()

    def wait_ready(self) -> CoreInfo:
        """Block until the model is loaded (its CoreInfo), or raise why it did not load."""
        if self.info is None:
            try:
                self.info = self._wait_ready(self._ready_conn, self._startup_timeout_s)
            except BaseException:  # a failed load, or Ctrl-C while loading: no core may outlive this
                self.kill()
                raise
            finally:
                self._ready_conn.close()
        return self.info

    def kill(self) -> None:
        """Stop the core at once (it may be loading and not listening for commands)."""
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._cleanup()

    def _wait_ready(self, conn, timeout_s: float) -> CoreInfo:
        deadline = time.monotonic() + timeout_s
        while not conn.poll(1.0):
            if not self.proc.is_alive():
                raise EngineDeadError(f"the engine process exited with code {self.proc.exitcode} "
                                      "while loading the model")
            if time.monotonic() > deadline:
                self.proc.kill()
                raise EngineDeadError("the engine process did not become ready in time")
        try:
            kind, _, payload = conn.recv_bytes().partition(b"\0")
        except EOFError:
            self.proc.join(5)
            raise EngineDeadError(f"the engine process exited (code {self.proc.exitcode}) while loading "
                                  "the model") from None
        if kind == _FAILED:
            self.proc.join(10)
            if self.proc.is_alive():  # it said why; it need not be waited for any longer
                self.proc.kill()
                self.proc.join(5)
            raise error_from_message(msgspec.msgpack.decode(payload, type=RequestError))
        return msgspec.msgpack.decode(payload, type=CoreInfo)

    def is_alive(self) -> bool:
        return self.proc.is_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        if self.proc.is_alive():
            try:
                self._control.send_multipart([_SHUTDOWN, OWNER_ID, b""])
            except zmq.ZMQError:
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        self._cleanup()

    def _cleanup(self) -> None:
        if not self._control.closed:
            self._control.close(linger=0)
            self._zmq.term()
        for name in ("in", "out"):
            try:
                os.unlink(os.path.join(self._dir, name))
            except OSError:
                pass
        try:
            os.rmdir(self._dir)
        except OSError:
            pass


# -- a front end -------------------------------------------------------------------------------------
class ZmqCoreClient:
    """An EngineCoreClient of a core in another process, as one of possibly several front ends.

    client_id names this front end to the core (its outputs are routed by it); the core's pid is watched so
    that a core that is gone fails callers instead of leaving them waiting.
    """

    def __init__(self, addresses: CoreAddresses, client_id: bytes = b"api-0", hello_timeout_s: float = 60.0):
        self.addresses = addresses
        self.client_id = client_id
        self._ctx = zmq.Context()
        self._inbox = self._ctx.socket(zmq.PUSH)  # to the core
        self._inbox.setsockopt(zmq.LINGER, 0)
        self._inbox.connect(addresses.input_addr)
        self._outbox = self._ctx.socket(zmq.DEALER)  # from the core
        self._outbox.setsockopt(zmq.LINGER, 0)
        self._outbox.setsockopt(zmq.ROUTING_ID, client_id)
        self._outbox.connect(addresses.output_addr)
        self._send_lock = threading.Lock()  # zmq sockets are not thread-safe; several threads send
        self._recv_lock = threading.Lock()  # held by the reader while it polls; shutdown takes it to close
        self._outputs_decoder = msgspec.msgpack.Decoder(EngineCoreOutputs)
        self._error_decoder = msgspec.msgpack.Decoder(RequestError)
        self._dead: BaseException | None = None
        try:
            self.info: CoreInfo = self._hello(hello_timeout_s)
        except BaseException:
            self._close_sockets()
            raise

    def _hello(self, timeout_s: float) -> CoreInfo:
        self._outbox.send(_HELLO)
        deadline = time.monotonic() + timeout_s
        while not self._outbox.poll(200):
            if not self._core_alive():
                raise EngineDeadError("the engine process is gone")
            if time.monotonic() > deadline:
                raise EngineDeadError("the engine process did not answer")
        kind, payload = self._outbox.recv_multipart()
        if kind != _READY:
            raise EngineDeadError("the engine process is not serving")
        return msgspec.msgpack.decode(payload, type=CoreInfo)

    def _core_alive(self) -> bool:
        return pid_alive(self.addresses.core_pid)

    @property
    def outputs_socket(self) -> zmq.Socket:
        """The socket the core's outputs arrive on (to poll several cores at once; only get_outputs reads it)."""
        return self._outbox

    # -- commands --------------------------------------------------------------------------------
    def _send(self, kind: bytes, payload: bytes) -> None:
        with self._send_lock:
            self._inbox.send_multipart([kind, self.client_id, payload])

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
            if self._outbox.closed:
                self._dead = EngineDeadError("the engine was shut down")
                raise self._dead
            wait = IDLE_POLL_S if deadline is None else max(0.0, min(IDLE_POLL_S, deadline - time.monotonic()))
            if self._outbox.poll(int(1000 * wait)):
                break
            if not self._core_alive():
                self._dead = EngineDeadError(f"the engine process is gone ({self._exit_note()})")
            elif deadline is not None and time.monotonic() >= deadline:
                return None
        kind, payload = self._outbox.recv_multipart(copy=False)
        if kind.bytes == _OUTPUTS:
            return self._outputs_decoder.decode(payload.buffer)
        if kind.bytes == _READY:  # a second hello's answer (never sent today): nothing to hand out
            return None
        err = self._error_decoder.decode(payload.buffer)
        self._dead = EngineDeadError(f"engine core died: {err.message}")
        raise self._dead

    def _exit_note(self) -> str:
        return "exited"

    def is_alive(self) -> bool:
        return self._dead is None and not self._inbox.closed and self._core_alive()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Let go of the core (it keeps serving other front ends; only its owner stops it)."""
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


class ProcessCoreClient(ZmqCoreClient):
    """An EngineCoreClient whose core runs in a child process this client starts, owns and stops."""

    def __init__(self, args: EngineArgs, startup_timeout_s: float = 1800.0, core_factory: Callable | None = None,
                 core_process: CoreProcess | None = None):
        """core_process: one already spawned (CoreProcess(wait=False)) to wait for instead of starting one."""
        self.core_process = core_process or CoreProcess(args, startup_timeout_s, core_factory)
        self.core_process.wait_ready()
        self.proc = self.core_process.proc
        try:
            super().__init__(self.core_process.addresses)
        except BaseException:
            self.core_process.shutdown()
            raise

    def _core_alive(self) -> bool:
        return self.proc.is_alive()

    def _exit_note(self) -> str:
        return f"code {self.proc.exitcode}"

    def shutdown(self, timeout: float = 30.0) -> None:
        self.core_process.shutdown(timeout)
        super().shutdown()
