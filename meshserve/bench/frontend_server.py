"""The real server (`meshserve serve`'s code path) around the model-less FakeEngineCore, for `bench frontend`.

`python -m meshserve.bench.frontend_server --port P --step-ms 20 [--api-server-count N] [--pid-file F]`: the
core produces one token per running request every step-ms; everything in front of it (HTTP, JSON, SSE,
detokenization with the embedded model's tokenizer, the ZeroMQ channel, N API processes) is the real thing.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve.bench.frontend_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1, help="fake engine cores behind the front end")
    p.add_argument("--step-ms", type=float, default=20.0, help="the fake core's step time")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--max-queue-len", type=int, default=1 << 20)
    p.add_argument("--no-gc-freeze", action="store_true", help="leave the start-up heap to the collector (A/B)")
    p.add_argument("--pid-file", default=None, help="write {core, api: [pids]} here once serving")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshserve").setLevel(logging.WARNING)
    from meshserve.bench.fake_core import fake_core_factory
    from meshserve.config import EngineArgs
    from meshserve.serve.api_server import HttpOptions, serve_api_processes, serve_one_process
    from meshserve.serve.cli import bind_listen_socket
    from meshserve.serve.config import ServeConfig

    args = EngineArgs(device="cpu", max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                      slo_ttft_ms=ns.slo_ttft_ms)
    config = ServeConfig(served_model_names=["fake"], max_queue_len=ns.max_queue_len, drain_timeout_s=5.0,
                         gc_freeze=not ns.no_gc_freeze)
    opts = HttpOptions(ns.host, ns.port, "warning", access_log=False)
    factory = fake_core_factory(ns.step_ms / 1e3, ns.max_num_seqs)

    def on_started(core_pids: list[int], api_pids: list[int]) -> None:
        if ns.pid_file:
            with open(ns.pid_file, "w") as f:
                json.dump({"core": core_pids[0], "cores": core_pids, "api": api_pids}, f)

    sock = bind_listen_socket(ns.host, ns.port)
    dp = ns.data_parallel_size
    if ns.api_server_count > 1:
        return serve_api_processes(args, config, sock, opts, ns.api_server_count, factory, on_started, dp)
    return serve_one_process(args, config, sock, opts, core_factory=factory, on_started=on_started,
                             data_parallel_size=dp)


if __name__ == "__main__":
    sys.exit(main())
