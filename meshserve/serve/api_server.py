"""Running the OpenAI app: one API process, or `--api-server-count N` of them sharing one engine core.

One process (the default): the engine core in a child process (or a thread, `--engine-in-thread`), the app
served by uvicorn on the socket the CLI bound.

N processes (vLLM's `--api-server-count`): HTTP parsing, JSON and SSE encoding, tokenization and
detokenization are per-request Python work on one GIL, so one API process saturates long before the GPU does.
This process starts the engine core and, while it loads, N API processes (their imports and tokenizers
overlap the model's load; each one's hello is answered once the core is ready) that each connect to it as a
front end of their own (the core routes every request's outputs back to the process that sent it) and serve on the one listening
socket, inherited from here (the kernel hands each connection to whichever process accepts first, i.e. the
least busy). /metrics: request series are kept in prometheus_client's multiprocess files and summed across
processes at every scrape; the engine's gauges are the same in every process. SIGTERM / SIGINT here drains
every API process (each answers 503 to new requests and finishes its streams), then stops the core; each
child dies with this process (PR_SET_PDEATHSIG), so nothing is orphaned; a core that fails to load stops
them all, with its error. Start-up: every process's phases are logged as one line (engine/startup_timeline.py).

Data parallel (`--data-parallel-size N`, the internal back end): N engine cores, each in its own process on its
own GPU slice, and every API process holds one client per core (engine/dp_core_client.py) that sends each
request to the least loaded core and streams its outputs back directly: no HTTP hop, no router process.

This module imports nothing heavy at the top: spawned API processes unpickle their arguments before
setting PROMETHEUS_MULTIPROC_DIR, which must come before prometheus_client is imported.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from meshserve.config import EngineArgs
from meshserve.distributed import process_start
from meshserve.distributed.launch import StopSignal, die_with_parent, stop_processes
from meshserve.engine import startup_timeline
from meshserve.errors import ServerDrainingError
from meshserve.serve import multiprocess_metrics
from meshserve.serve.config import ServeConfig

logger = logging.getLogger(__name__)

# how long a core may take to load (a large checkpoint from a slow disk); its death ends any wait at once
_CORE_STARTUP_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class HttpOptions:
    """uvicorn's settings of every API process."""

    host: str = "0.0.0.0"
    port: int = 8000
    log_level: str = "info"
    access_log: bool = True
    # TLS (vLLM's --ssl-* flags): HTTPS when certfile is set
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE
    ssl_ciphers: str | None = None
    uds: str | None = None  # --uds: a unix socket instead of host:port
    access_log_skip: tuple[str, ...] = ()  # paths without access-log lines

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_certfile else "http"

    @property
    def url(self) -> str:
        """Where the server listens, as the start-up line shows it."""
        return f"unix:{self.uds}" if self.uds else f"{self.scheme}://{self.host}:{self.port}"

    def uvicorn_ssl(self) -> dict:
        """uvicorn.Config's TLS keywords (none without a certificate)."""
        if not self.ssl_certfile:
            return {}
        tls = {"ssl_keyfile": self.ssl_keyfile, "ssl_certfile": self.ssl_certfile,
               "ssl_ca_certs": self.ssl_ca_certs, "ssl_cert_reqs": self.ssl_cert_reqs}
        return tls | ({"ssl_ciphers": self.ssl_ciphers} if self.ssl_ciphers else {})


def serve_http(allm, config: ServeConfig, sock: socket.socket, opts: HttpOptions,
               on_listening: Callable[[startup_timeline.Segment], None] | None = None) -> None:
    """Serve the app around allm on sock until SIGTERM / SIGINT (drain, then return). on_listening(this
    process's start-up segment): called once the app accepts connections (default: log the start-up
    timeline, this process's and the core's)."""
    import uvicorn

    from meshserve.serve.middleware import ServerState
    from meshserve.serve.openai_api import build_app
    from meshserve.serve.server import DrainingServer

    state = ServerState()
    app = build_app(allm, config, state)
    startup_timeline.mark("app built")

    def log_timeline(own: startup_timeline.Segment) -> None:
        segments = startup_timeline.merge(own, allm.core_client.info.startup)
        logger.info("%s", startup_timeline.summary(segments))

    def listening() -> None:
        startup_timeline.mark("listening")
        own = startup_timeline.current()
        app.state.metrics.startup_seconds.set(own.end - own.launch)
        (on_listening or log_timeline)(own)
    uv_config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level=opts.log_level,
                               access_log=opts.access_log, timeout_graceful_shutdown=2,
                               # longer than clients' and load balancers' idle timeouts, so the client side
                               # closes first (no request sent on a connection as it closes)
                               timeout_keep_alive=75, uds=opts.uds, **opts.uvicorn_ssl())
    from meshserve.serve.access_log_filter import skip_access_log

    skip_access_log(opts.access_log_skip)  # after uvicorn.Config, which configures its loggers
    if config.gc_freeze:  # last, once everything start-up made exists: full collections skip it from now on
        from meshserve.engine.heap import freeze_startup_heap

        freeze_startup_heap()

    # at the drain timeout what is still in flight ends in-band, before uvicorn cuts its connections mid-body
    def end_in_flight() -> None:
        allm.fail_in_flight(ServerDrainingError("the server is shutting down: the drain timeout passed"))

    DrainingServer(uv_config, state, config.drain_timeout_s, listening, end_in_flight).run(sockets=[sock])


def serve_one_process(engine_args: EngineArgs, config: ServeConfig, sock: socket.socket, opts: HttpOptions,
                      engine_in_thread: bool = False, core_factory: Callable | None = None,
                      on_started: Callable | None = None, data_parallel_size: int = 1) -> int:
    """on_started(core pids, API pids) is called once serving starts (benchmarks watch their CPU time)."""
    allm = start_async_llm(engine_args, engine_in_thread, core_factory, data_parallel_size)
    try:
        if on_started is not None:
            on_started(_core_pids(allm.core_client), [os.getpid()])
        print(f"meshserve: serving {config.model_name} on {opts.url}", flush=True)
        serve_http(allm, config, sock, opts)
    finally:
        allm.shutdown()
        sock.close()
    return 0


def start_async_llm(engine_args: EngineArgs, engine_in_thread: bool = False, core_factory: Callable | None = None,
                    data_parallel_size: int = 1):
    """The AsyncLLM one API process serves from, its core(s) started as `serve` starts them."""
    if data_parallel_size > 1:
        return _start_data_parallel(engine_args, data_parallel_size, core_factory)
    return _start_engine(engine_args, engine_in_thread, core_factory)


def _start_engine(engine_args: EngineArgs, engine_in_thread: bool, core_factory: Callable | None):
    core = None
    startup_timeline.begin("api")
    if not engine_in_thread:  # the default: the step loop in its own process, off this process's GIL
        from meshserve.engine.core_process import CoreProcess

        # spawned first: the model loads while this process imports the app and loads the tokenizer
        core = CoreProcess(engine_args, core_factory=core_factory, wait=False)
        startup_timeline.mark("core spawned")
    try:
        _import_front_end(engine_args)
        startup_timeline.mark("imports")
        from meshserve.engine.async_engine import AsyncLLM
        from meshserve.engine.early_tokenizer import EarlyTokenizer

        tokenizer = EarlyTokenizer(engine_args)  # after the imports: this thread imports no more of transformers
        if core is not None:
            core.wait_ready()
            startup_timeline.mark("waiting for the core")
        allm = AsyncLLM.from_engine_args(engine_args, separate_process=not engine_in_thread,
                                         core_factory=core_factory, core_process=core,
                                         tokenizer_loader=tokenizer.load, tokenizer_copier=tokenizer.copy_of)
        startup_timeline.mark("tokenizer + core client")
        return allm
    except BaseException:  # a failed load, or Ctrl-C while importing or loading: the core goes too
        if core is not None:
            core.kill()
        raise


def _start_data_parallel(engine_args: EngineArgs, num_cores: int, core_factory: Callable | None):
    """N engine cores, each in its own process on its own GPUs, behind one AsyncLLM (dp_core_client.py)."""
    from meshserve.engine.dp_core_client import DPCoreClient, spawn_dp_cores

    cores = spawn_dp_cores(engine_args, num_cores, core_factory)  # the models load while this process imports
    try:
        _import_front_end(engine_args)
        from meshserve.engine.async_engine import AsyncLLM
        from meshserve.engine.input_processor import load_tokenizer

        client = DPCoreClient.from_core_processes(engine_args, cores)
    except BaseException:
        for core in cores:
            core.kill()
        raise
    try:
        return AsyncLLM(client, load_tokenizer(client.info.tokenizer))
    except BaseException:
        client.shutdown()
        raise


def _core_pids(client) -> list[int]:
    """The pids of the engine core processes behind a core client (this process's when the core is a thread)."""
    clients = getattr(client, "clients", [client])
    return [c.proc.pid if getattr(c, "proc", None) is not None else os.getpid() for c in clients]


def _import_front_end(engine_args: EngineArgs) -> None:
    """Import what serving needs besides the engine (seconds on a small CPU), so it overlaps the model load;
    transformers' tokenizer base only for a model that can have a tokenizer (presets have none). Not
    AutoTokenizer's module (4-6 s, torch): direct_tokenizer mostly goes round it, and imports it where needed."""
    from meshserve.engine.early_tokenizer import has_no_tokenizer

    if not has_no_tokenizer(engine_args):
        import transformers.tokenization_utils_tokenizers  # noqa: F401 - the tokenizers' base class
    import uvicorn  # noqa: F401

    import meshserve.serve.openai_api  # noqa: F401


# -- N API processes ---------------------------------------------------------------------------------
def _api_process_main(addresses: list, index: int, config: ServeConfig, sock: socket.socket, opts: HttpOptions,
                      metrics_dir: str, log_level: int, engine_args: EngineArgs, ready_queue) -> None:
    """One API process, started while the core(s) load: imports, its tokenizer, then each core's hello (which
    a core answers once it is ready); puts its start-up segment on ready_queue once it listens."""
    multiprocess_metrics.enter(metrics_dir)  # before prometheus_client is imported
    die_with_parent()
    os.setpgrp()  # a terminal's Ctrl-C reaches the parent only; it drains everyone once
    logging.basicConfig(format=f"%(levelname)s api-{index} %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshserve").setLevel(log_level)
    startup_timeline.begin(f"api-{index}")
    _import_front_end(engine_args)
    from meshserve.engine.async_engine import AsyncLLM
    from meshserve.engine.core_process import ZmqCoreClient
    from meshserve.engine.early_tokenizer import EarlyTokenizer
    from meshserve.errors import EngineDeadError

    startup_timeline.mark("imports")
    tokenizer = EarlyTokenizer(engine_args)
    clients: list[ZmqCoreClient] = []
    try:
        for addr in addresses:  # one core, or one per data-parallel core
            clients.append(ZmqCoreClient(addr, f"api-{index}".encode(), hello_timeout_s=_CORE_STARTUP_TIMEOUT_S))
    except BaseException as e:
        for c in clients:
            c.shutdown()
        if isinstance(e, EngineDeadError):  # a core did not come up: the parent, its owner, says why
            sys.exit(1)
        raise
    if len(clients) > 1:
        from meshserve.engine.dp_core_client import DPCoreClient

        client = DPCoreClient(clients)
    else:
        client = clients[0]
    startup_timeline.mark("waiting for the core")
    try:
        tok = tokenizer.load(client.info.tokenizer)
        allm = AsyncLLM(client, tok, tokenizer.copy_of(tok))
    except BaseException:
        client.shutdown()
        raise
    startup_timeline.mark("tokenizer")

    def report(own: startup_timeline.Segment) -> None:  # the parent logs every timeline once all listen
        ready_queue.put(msgspec.msgpack.encode(own))

    try:
        serve_http(allm, config, sock, opts, on_listening=report)
    finally:
        allm.shutdown()
        sock.close()


def serve_api_processes(engine_args: EngineArgs, config: ServeConfig, sock: socket.socket, opts: HttpOptions,
                        count: int, core_factory: Callable | None = None,
                        on_started: Callable | None = None, data_parallel_size: int = 1) -> int:
    """Start the core (or data_parallel_size cores) and `count` API processes on sock; supervise them until a
    signal or a death. on_started(core pids, API pids) is called once all are started (benchmarks watch their
    CPU time)."""
    from meshserve.engine.dp_core_client import spawn_dp_cores

    stop = StopSignal()
    previous: dict = {}
    cores: list = []
    procs: list = []
    metrics_dir = multiprocess_metrics.new_dir()
    startup_timeline.begin("cli")
    try:
        cores = spawn_dp_cores(engine_args, data_parallel_size, core_factory, _CORE_STARTUP_TIMEOUT_S)
        startup_timeline.mark("core spawned")
        sock.listen(2048)  # connections queue in the kernel until an API process accepts them
        ready_queue = process_start.context().SimpleQueue()
        log_level = logging.getLogger("meshserve").getEffectiveLevel()
        for i in range(count):  # now: their imports and tokenizers overlap the model's load
            p = process_start.new_process(_api_process_main, ([c.addresses for c in cores], i, config, sock, opts,
                                                              metrics_dir, log_level, engine_args, ready_queue),
                                          name=f"meshserve-api-{i}")
            p.start()
            procs.append(p)
        startup_timeline.mark("API processes spawned")
        try:
            for core in cores:  # a failed load raises (the finally stops everyone); Ctrl-C: KeyboardInterrupt
                core.wait_ready()
        except BaseException:  # the others may be loading and deaf to a shutdown command
            for core in cores:
                core.kill()
            raise
        startup_timeline.mark("waiting for the core")
        previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
        dp = f", {len(cores)} engine cores" if len(cores) > 1 else ""
        print(f"meshserve: serving {config.model_name} on {opts.url} "
              f"({count} API processes{dp})", flush=True)
        if on_started is not None:
            on_started([c.proc.pid for c in cores], [p.pid for p in procs])
        timeline = _TimelineReports([seg for c in cores for seg in c.info.startup], ready_queue, count)
        code = _supervise(cores, procs, stop, timeline.poll)

        def cut_short(sig: int, frame) -> None:  # a second signal: passed on, they stop without finishing
            logger.warning("second %s: the API processes stop without finishing the drain",
                           signal.Signals(sig).name)
            for p in procs:
                if p.is_alive():
                    os.kill(p.pid, signal.SIGTERM)

        for s in previous:
            signal.signal(s, cut_short)
        stop_processes(procs, config.drain_timeout_s + 5.0)
        return code
    finally:
        stop_processes(procs, 0.0)
        for core in cores:
            core.shutdown()
        sock.close()
        multiprocess_metrics.remove_dir(metrics_dir)
        for s, handler in previous.items():
            signal.signal(s, handler)


class _TimelineReports:
    """Collects the API processes' start-up segments; logs the whole timeline once all of them listen."""

    def __init__(self, core_segments: list, ready_queue, count: int):
        self.own = startup_timeline.current()
        self.core_segments = core_segments
        self.queue = ready_queue
        self.count = count
        self.api_segments: list = []

    def poll(self) -> None:
        while len(self.api_segments) < self.count and not self.queue.empty():
            self.api_segments.append(msgspec.msgpack.decode(self.queue.get(), type=startup_timeline.Segment))
            if len(self.api_segments) == self.count:
                segments = [self.own, *self.core_segments, *sorted(self.api_segments, key=lambda s: s.label)]
                logger.info("%s", startup_timeline.summary(segments))


def _supervise(cores: list, procs: list, stop: StopSignal, on_tick: Callable[[], None] = lambda: None) -> int:
    """Wait for a signal (exit 0 after draining) or for a process to die (exit 1: a server that lost a part of
    itself stops, so that whatever supervises it restarts the whole)."""
    while True:
        on_tick()
        if stop.signal is not None:
            logger.warning("%s: draining %d API processes", signal.Signals(stop.signal).name, len(procs))
            return 0
        dead_cores = [c for c in cores if not c.is_alive()]
        if dead_cores:
            logger.error("an engine core exited (code %s); stopping", dead_cores[0].proc.exitcode)
            return 1
        dead = [p for p in procs if not p.is_alive()]
        if dead:
            logger.error("API process %s exited (code %s); stopping", dead[0].name, dead[0].exitcode)
            return 1
        time.sleep(0.2)

