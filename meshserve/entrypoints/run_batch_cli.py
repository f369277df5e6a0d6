"""`meshserve run-batch -i IN.jsonl -o OUT.jsonl [serve's flags]`: an OpenAI batch file, offline (vLLM's run-batch).

The engine starts as `meshserve serve` starts it, and the requests go to the same app in process
(run_batch.py), so each answer is the one the server would give for the same body. -i and -o may be http(s)
URLs, as vLLM's: the input downloaded before the model loads, the output spooled locally and PUT at the end
(run_batch_urls.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from meshserve.cli_args import engine_args_from
from meshserve.cli_paths import check_input_file, check_output_file, check_output_folder
from meshserve.engine.args_check import check_engine_args
from meshserve.entrypoints.batch_lines import BATCH_URLS, BatchLineError, BatchRequest, parse_batch_lines
from meshserve.entrypoints.run_batch import BatchProgress, run_batch
from meshserve.entrypoints.run_batch_urls import check_url, download, is_url, new_spool, shown, upload
from meshserve.entrypoints.worker import is_rank_zero, run_worker_ranks
from meshserve.errors import InvalidArgumentError
from meshserve.serve.cli import add_serve_args, serve_config_from
from meshserve.serve.config import ServeConfig
from meshserve.serve.vllm_compat_args import apply_vllm_compat

# a few engine batches' worth, so the engine's queue never runs dry between steps
DEFAULT_MAX_CONCURRENT_REQUESTS = 512
_PROGRESS_EVERY_S = 0.5


def register(subparsers) -> None:
    """Add the `run-batch` subcommand to meshserve's subparsers."""
    p = subparsers.add_parser(
        "run-batch", help="run an OpenAI batch file (JSONL) through the server's endpoints, offline",
        description="Answer each line of an OpenAI Batch API input file (" + ", ".join(BATCH_URLS) + ") as "
                    "`meshserve serve` would, and write OpenAI's batch output lines in input order. Takes every "
                    "`serve` flag; those of HTTP itself (--host, --port, --api-key, TLS, ...) have no effect.")
    g = p.add_argument_group("batch")
    g.add_argument("-i", "--input-file", default=None, metavar="FILE",
                   help="the batch input, one request a line ('-': standard input; an http(s) URL: downloaded "
                        "with GET before the model loads)")
    g.add_argument("-o", "--output-file", default=None, metavar="FILE",
                   help="where the output lines go ('-': standard output; an http(s) URL: uploaded with one PUT "
                        "once the batch is done)")
    g.add_argument("--output-tmp-dir", default=None, metavar="DIR",
                   help="with -o URL: the folder of the local file the output lines are written to before the "
                        "upload (default: the system's temporary folder)")
    g.add_argument("--max-concurrent-requests", type=int, default=DEFAULT_MAX_CONCURRENT_REQUESTS, metavar="N",
                   help="requests in flight at once; the engine batches up to --max-num-seqs of them")
    add_serve_args(p)
    p.set_defaults(func=_cmd_run_batch, serve_parser=p)  # the parser: --config FILE parses its flags


def _read_batch(path: str | None) -> list[BatchRequest | BatchLineError]:
    if not path:
        raise InvalidArgumentError("-i/--input-file is required (a JSONL file, or '-' for standard input)",
                                   param="input_file")
    try:
        if path == "-":
            batch = parse_batch_lines(sys.stdin)
        elif is_url(path):
            data = download(path, "-i", "input_file")
            path = shown(path)
            batch = parse_batch_lines(data.decode("utf-8").split("\n"))  # at \n only, as a file's lines
        else:
            check_input_file(path, "-i")
            with open(path, encoding="utf-8") as f:  # lines split at \n only: JSON may hold a raw U+2028
                batch = parse_batch_lines(f)
    except UnicodeDecodeError as e:
        raise InvalidArgumentError(f"-i {path}: not UTF-8 text ({e.reason})",
                                   param="input_file") from None
    if not batch:
        raise InvalidArgumentError(f"-i {path}: no requests in it", param="input_file")
    return batch


def _check_output(path: str | None, tmp_dir: str | None, input_path: str | None) -> None:
    """-o before anything loads: a URL's form only (a test PUT would create the object: run_batch_urls.py); a
    local file must not be the input (opening it for writing would empty the input before it is read)."""
    if not path:
        raise InvalidArgumentError("-o/--output-file is required (a file, '-' for standard output, or an http(s) "
                                   "URL)", param="output_file")
    if is_url(path):
        check_url(path, "-o", "output_file")
        check_output_folder(tmp_dir, "--output-tmp-dir")
    elif path != "-":
        check_output_file(path, "-o")
        if input_path and input_path != "-" and not is_url(input_path) and os.path.exists(path) \
                and os.path.exists(input_path) and os.path.samefile(path, input_path):
            raise InvalidArgumentError(f"-o {path} is the input file (-i {input_path}): the output would overwrite "
                                       "it; write the output elsewhere", param="output_file")


@contextlib.contextmanager
def _output(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdout
        return
    with open(path, "w", encoding="utf-8") as f:
        yield f


def _batch_config(ns: argparse.Namespace) -> ServeConfig:
    """serve's config, less what only a socket needs: no API key (no client to send one), and a queue that
    holds every request this batch puts in flight (no 429 for our own concurrency)."""
    from meshserve.models.embedded import DEFAULT_MODEL_NAME

    if ns.max_concurrent_requests < 1:
        raise InvalidArgumentError("--max-concurrent-requests must be >= 1", param="max_concurrent_requests")
    config = serve_config_from(ns, ns.model or DEFAULT_MODEL_NAME)
    return dataclasses.replace(config, api_key=None,
                               max_queue_len=max(config.max_queue_len, ns.max_concurrent_requests))


def _check_layout(ns: argparse.Namespace) -> None:
    if ns.data_parallel_size < 1:
        raise InvalidArgumentError("--data-parallel-size must be >= 1", param="data_parallel_size")
    if ns.data_parallel_size > 1 and ns.data_parallel_backend == "router":
        raise InvalidArgumentError("--data-parallel-backend router puts HTTP replicas behind `meshserve router`: "
                                   "run-batch uses the internal back end", param="data_parallel_backend")
    if ns.data_parallel_size > 1 and ns.engine_in_thread:
        raise InvalidArgumentError("--data-parallel-size > 1 runs each engine core in its own process "
                                   "(drop --engine-in-thread)", param="data_parallel_size")


class _ProgressLine:
    """On a terminal, one line on stderr rewritten as requests finish; the summary replaces it at the end."""

    def __init__(self, output: str):
        self.output = output
        self.live = sys.stderr.isatty()
        self.last = 0.0

    def update(self, progress: BatchProgress) -> None:
        now = time.monotonic()
        if self.live and now - self.last >= _PROGRESS_EVERY_S:
            self.last = now
            print(f"\rmeshserve run-batch: {progress.num_done}/{progress.num_requests} done "
                  f"({progress.num_ok} ok, {progress.num_failed} failed), {progress.seconds:.1f} s",
                  end="", file=sys.stderr, flush=True)

    def summary(self, progress: BatchProgress) -> None:
        where = "standard output" if self.output == "-" else shown(self.output)
        requests = f"{progress.num_requests} request" + ("" if progress.num_requests == 1 else "s")
        print(("\r\033[K" if self.live else "") + f"meshserve run-batch: {requests}, {progress.num_ok} ok, "
              f"{progress.num_failed} failed, {progress.seconds:.1f} s -> {where}", file=sys.stderr, flush=True)


def _cmd_run_batch(ns: argparse.Namespace) -> int:
    apply_vllm_compat(ns)  # vLLM's flags (and --config FILE) first, as serve
    _check_output(ns.output_file, ns.output_tmp_dir, ns.input_file)  # bad paths and input fail before anything loads,
    batch = _read_batch(ns.input_file)  # a bad -o before a large -i URL is downloaded
    config = _batch_config(ns)
    if ns.auto:
        from meshserve.serve.auto_layout import apply_auto_layout

        apply_auto_layout(ns)
    _check_layout(ns)
    engine_args = engine_args_from(ns)
    check_engine_args(engine_args)
    if not is_rank_zero(engine_args):  # another node's ranks: serve the model shards only
        return run_worker_ranks(engine_args)

    from meshserve.serve.api_server import start_async_llm
    from meshserve.serve.openai_api import build_app

    # -o URL: the lines go to a local file, uploaded once the engine is down (its memory freed)
    spool = new_spool(ns.output_tmp_dir) if is_url(ns.output_file) else None
    try:
        allm = start_async_llm(engine_args, ns.engine_in_thread, data_parallel_size=ns.data_parallel_size)
        try:
            app = build_app(allm, config)
            line = _ProgressLine(ns.output_file)
            with _output(spool or ns.output_file) as out:
                progress = asyncio.run(run_batch(app, batch, out, ns.max_concurrent_requests, line.update))
        finally:
            allm.shutdown()
    except BaseException:
        if spool is not None:  # no batch ran to the end: nothing to upload or keep
            with contextlib.suppress(OSError):
                os.remove(spool)
        raise
    if spool is not None:
        upload(spool, ns.output_file, "-o")  # a failure keeps the file and names it
    line.summary(progress)
    return 0
