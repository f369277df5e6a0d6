"""`meshserve serve [MODEL]`: the OpenAI-compatible server, with vLLM's flag names."""

from __future__ import annotations

import argparse
import logging
import os
import socket

from meshserve.cli_args import add_engine_args, engine_args_from
from meshserve.cli_paths import check_output_file
from meshserve.engine.args_check import check_engine_args
from meshserve.entrypoints.worker import is_rank_zero, run_worker_ranks
from meshserve.errors import InvalidArgumentError
from meshserve.serve.config import DEFAULT_MAX_REQUEST_BODY_BYTES, ServeConfig
from meshserve.serve.reasoning import REASONING_PARSERS
from meshserve.serve.tool_parsers import TOOL_PARSERS
from meshserve.serve.vllm_compat_args import (
    add_vllm_compat_args,
    apply_vllm_compat,
    bind_unix_socket,
    compat_http_fields,
    compat_serve_fields,
)

logger = logging.getLogger(__name__)


def register(subparsers) -> None:
    """Add the `serve` subcommand to meshserve's subparsers."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server",
                              description="Serve a model over an OpenAI-compatible HTTP API.")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="model to serve (same as --model); default: the embedded SmolLM2-135M-Instruct")
    add_serve_args(p)
    # the parser itself goes along: data parallel rebuilds each replica's flags from it
    p.set_defaults(func=_cmd_serve, serve_parser=p)


def _dp_backend_name(text: str) -> str:
    """vLLM's --data-parallel-backend mp (local engine processes) is meshserve's internal back end."""
    return "internal" if text == "mp" else text


def add_serve_args(p: argparse.ArgumentParser) -> None:
    """Every flag of `serve` but its MODEL: the server's, the engine's and vLLM's (`run-batch` takes them too)."""
    g = p.add_argument_group("server")
    g.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", nargs="+",
                   default=os.environ.get("MESHSERVE_API_KEY") or os.environ.get("VLLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (one of these keys) on /v1 routes "
                        "(default: $MESHSERVE_API_KEY, else vLLM's $VLLM_API_KEY)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) the model answers to; the first is used in responses")
    g.add_argument("--max-queue-len", type=int, default=1024,
                   help="waiting requests past which new ones get 429 + Retry-After")
    g.add_argument("--max-request-body-bytes", type=int, default=DEFAULT_MAX_REQUEST_BODY_BYTES)
    g.add_argument("--drain-timeout", "--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (then they end with a 503 or, "
                        "streaming, an error event); 0: at once (vLLM's --shutdown-timeout, whose default is 0)")
    g.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    g.add_argument("--disable-access-log", action="store_true", help="no per-request log lines")
    g.add_argument("--request-log", default=None, metavar="FILE",
                   help="append a JSON line per served prompt (arrival time, prompt and output tokens, TTFT): "
                        "the traffic `meshserve simulate --trace FILE` replays")
    g.add_argument("--responses-store-size", type=int, default=0, metavar="N",
                   help="keep the last N /v1/responses answers in memory for previous_response_id and GET "
                        "/v1/responses/{id} (default 0: none kept; one API process only)")
    g.add_argument("--engine-in-thread", action="store_true",
                   help="run the engine loop in a thread of the server process (default: its own process)")
    g.add_argument("--api-server-count", "-asc", type=int, default=None,
                   help="API processes sharing the engine core(s) and the port (HTTP, JSON and detokenization off "
                        "one GIL); default 1, or --data-parallel-size on the internal DP back end (as vLLM)")
    g.add_argument("--auto", action="store_true",
                   help="let the planner pick TP/PP/DP for the visible GPUs (prints the choice and why)")
    g.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="engine replicas, each with its own TP x PP GPUs (see --data-parallel-backend)")
    g.add_argument("--data-parallel-backend", "-dpb", choices=["internal", "router"], default="internal",
                   type=_dp_backend_name,
                   help="internal (default; vLLM's mp): one engine-core process per replica, each API process sends "
                        "every request to the least loaded core and streams it back itself; router: each replica a "
                        "child `meshserve serve` behind `meshserve router` (an HTTP hop, with restarts)")
    g.add_argument("--router-workers", type=int, default=None,
                   help="--data-parallel-backend router: the router's processes on the port "
                        "(`meshserve router --workers`; default min(4, cores))")
    g.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='allow tool_choice "auto": the model decides to call tools, --tool-call-parser reads them')
    g.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="the tool-call format of the model's chat template (as vLLM names them)")
    g.add_argument("--reasoning-parser", default=None, metavar="{" + ",".join(sorted(REASONING_PARSERS)) + "}",
                   help="split a reasoning model's chat output into message.reasoning and message.content "
                        "(as vLLM names the parsers)")
    g.add_argument("--no-gc-freeze", action="store_true",
                   help="leave the API processes' start-up heap to the garbage collector (by default it is frozen "
                        "once serving: full collections otherwise stall the event loop 0.1-0.4 s under load)")
    add_engine_args(p)
    add_vllm_compat_args(p)


def serve_config_from(ns: argparse.Namespace, model: str) -> ServeConfig:
    if ns.max_queue_len < 1:
        raise InvalidArgumentError("--max-queue-len must be >= 1", param="max_queue_len")
    if ns.max_request_body_bytes < 1:
        raise InvalidArgumentError("--max-request-body-bytes must be >= 1", param="max_request_body_bytes")
    if not ns.drain_timeout >= 0:  # NaN too
        raise InvalidArgumentError(f"--drain-timeout must be >= 0, got {ns.drain_timeout}", param="drain_timeout")
    if ns.served_model_name is not None and not all(name.strip() for name in ns.served_model_name):
        raise InvalidArgumentError("--served-model-name: a name is empty", param="served_model_name")
    keys = [ns.api_key] if isinstance(ns.api_key, str) else ns.api_key or []
    if not all(key.strip() for key in keys):  # "" used to mean no authentication at all
        if isinstance(ns.api_key, str):  # the environment's default (the flag gives a list): name the variable
            var = "MESHSERVE_API_KEY" if ns.api_key == os.environ.get("MESHSERVE_API_KEY") else "VLLM_API_KEY"
            raise InvalidArgumentError(f"${var} is set but empty: give it a key, or unset it to serve without "
                                       "one", param="api_key")
        raise InvalidArgumentError('--api-key: a key is empty (an unset variable in --api-key "$KEY"?)',
                                   param="api_key")
    check_output_file(ns.request_log, "--request-log")
    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise InvalidArgumentError("--enable-auto-tool-choice needs --tool-call-parser", param="tool_call_parser")
    if ns.responses_store_size < 0:
        raise InvalidArgumentError("--responses-store-size must be >= 0", param="responses_store_size")
    if ns.reasoning_parser is not None and ns.reasoning_parser not in REASONING_PARSERS:
        raise InvalidArgumentError(f"unknown --reasoning-parser {ns.reasoning_parser!r}; choose from "
                                   f"{', '.join(sorted(REASONING_PARSERS))}", param="reasoning_parser")
    if not 0 <= ns.port <= 65535:
        raise InvalidArgumentError("--port must be in [0, 65535]", param="port")
    return ServeConfig(served_model_names=ns.served_model_name or [model], api_key=ns.api_key or None,
                       max_queue_len=ns.max_queue_len, max_request_body_bytes=ns.max_request_body_bytes,
                       drain_timeout_s=ns.drain_timeout,
                       enable_auto_tool_choice=ns.enable_auto_tool_choice, tool_call_parser=ns.tool_call_parser,
                       reasoning_parser=ns.reasoning_parser,
                       gc_freeze=not ns.no_gc_freeze, request_log=ns.request_log,
                       responses_store_size=ns.responses_store_size, **compat_serve_fields(ns))


def check_responses_store(ns: argparse.Namespace) -> None:
    """The store is one API process's memory: a follow-up (previous_response_id) must reach that process. The
    router back end's replicas each have their own (one API process each), and the router sends a follow-up to
    the replica that keeps its response (router/response_affinity.py)."""
    if not ns.responses_store_size:
        return
    replicas = ns.data_parallel_size if ns.data_parallel_backend == "router" else 1
    if (ns.api_server_count or ns.data_parallel_size // replicas) > 1:  # unset: one API process per engine core
        raise InvalidArgumentError("--responses-store-size keeps responses in one API process's memory: it needs "
                                   "--api-server-count 1", param="responses_store_size")


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound now (uvicorn serves on it later); a clear error if the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise InvalidArgumentError(f"cannot listen on {host}:{port}: {e.strerror or e}", param="port") from None
    return sock


def _cmd_serve(ns: argparse.Namespace) -> int:
    from meshserve.engine import startup_timeline
    from meshserve.models.embedded import DEFAULT_MODEL_NAME

    startup_timeline.begin("cli", hand_over=True)  # the server's own timeline continues from here
    startup_timeline.mark("python + CLI")
    if ns.log_level.upper() == "WARNING":  # the default: a server shows what start-up is doing, as vLLM does
        logging.getLogger("meshserve").setLevel(logging.INFO)
    apply_vllm_compat(ns)  # vLLM's flags: refusals and aliases first

    if ns.model_tag and ns.model and ns.model_tag != ns.model:
        raise InvalidArgumentError(f"two models given: {ns.model_tag!r} and --model {ns.model!r}", param="model")
    ns.model = ns.model_tag or ns.model
    config = serve_config_from(ns, ns.model or DEFAULT_MODEL_NAME)
    if ns.auto:
        from meshserve.serve.auto_layout import apply_auto_layout

        apply_auto_layout(ns)
    if ns.data_parallel_size < 1:
        raise InvalidArgumentError("--data-parallel-size must be >= 1", param="data_parallel_size")
    dp = ns.data_parallel_size
    check_responses_store(ns)
    engine_args = engine_args_from(ns)
    check_engine_args(engine_args)  # bad flags, paths and layouts fail now, not after loading (or in replicas)
    if dp > 1 and ns.data_parallel_backend == "router":  # N child `meshserve serve` replicas + the router here
        from meshserve.router.launcher import serve_data_parallel

        return serve_data_parallel(ns, ns.serve_parser)
    if dp > 1 and ns.engine_in_thread:
        raise InvalidArgumentError("--data-parallel-size > 1 runs each engine core in its own process "
                                   "(drop --engine-in-thread)", param="data_parallel_size")
    if dp > 1 and engine_args.nnodes > 1:
        raise InvalidArgumentError("the internal data-parallel back end runs on one node; across nodes, run one "
                                   "group per replica and `meshserve router` in front", param="data_parallel_size")
    if not is_rank_zero(engine_args):  # another node's ranks: serve the model shards, no HTTP
        return run_worker_ranks(engine_args)
    if ns.api_server_count is None:  # one API process per engine core: the front end scales with the cores
        ns.api_server_count = dp
    if ns.api_server_count < 1:
        raise InvalidArgumentError("--api-server-count must be >= 1", param="api_server_count")
    if ns.api_server_count > 1 and ns.engine_in_thread:
        raise InvalidArgumentError("--api-server-count > 1 needs the engine in its own process "
                                   "(drop --engine-in-thread)", param="api_server_count")
    # a port (or socket path) in use fails before the model loads
    sock = bind_unix_socket(ns.uds) if ns.uds else bind_listen_socket(ns.host, ns.port)
    from meshserve.serve.api_server import HttpOptions, serve_api_processes, serve_one_process

    # the bound port: with --port 0 the kernel's choice, which the "serving on" line must show
    port = ns.port if ns.uds else sock.getsockname()[1]
    opts = HttpOptions(ns.host, port, ns.uvicorn_log_level, not ns.disable_access_log, **compat_http_fields(ns))
    if ns.api_server_count > 1:
        return serve_api_processes(engine_args, config, sock, opts, ns.api_server_count, data_parallel_size=dp)
    try:
        return serve_one_process(engine_args, config, sock, opts, ns.engine_in_thread, data_parallel_size=dp)
    except BaseException:
        sock.close()
        raise
