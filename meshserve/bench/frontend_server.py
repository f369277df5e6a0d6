"""The real server (`meshserve serve`'s code path) around a model-less core, for `bench frontend`.

`python -m meshserve.bench.frontend_server --port P --step-ms 20 [--api-server-count N] [--pid-file F]`: the
core (FakeEngineCore) produces one token per running request every step-ms; everything in front of it (HTTP,
JSON, SSE, detokenization with the embedded model's tokenizer, the ZeroMQ channel, N API processes) is the real
thing. With `--real-core PRESET` the core is the real EngineCore too (its scheduler, SLO policy, step trace and
runner) with the forward removed and an emulated device time per step (bench/real_core.py): the serving core's
own host cost, measurable on a CPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from meshserve.bench.real_core import (
    H200_QWEN3_06B_BASE_MS,
    H200_QWEN3_06B_US_PER_CONTEXT_TOKEN,
    H200_QWEN3_06B_US_PER_TOKEN,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meshserve.bench.frontend_server")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-server-count", type=int, default=1)
    p.add_argument("--data-parallel-size", type=int, default=1, help="fake engine cores behind the front end")
    p.add_argument("--step-ms", type=float, default=20.0, help="the fake core's step time")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--model", default=None, help="the served model (config only: the core is fake; default: the "
                                                "embedded model), e.g. a preset with --tokenizer where the "
                                                "embedded model is not installed")
    p.add_argument("--tokenizer", default=None, help="the served tokenizer (a folder or file; with --real-core too)")
    p.add_argument("--slo-ttft-ms", type=float, default=None)
    p.add_argument("--max-queue-len", type=int, default=1 << 20)
    p.add_argument("--no-gc-freeze", action="store_true", help="leave the start-up heap to the collector (A/B)")
    p.add_argument("--pid-file", default=None, help="write {core, api: [pids]} here once serving")
    real = p.add_argument_group("--real-core: the real EngineCore, model removed, device emulated (real_core.py)")
    real.add_argument("--real-core", default=None, metavar="PRESET",
                      help="a model preset (dummy weights, --real-core-layers layers, on the CPU)")
    real.add_argument("--real-core-layers", type=int, default=1)
    real.add_argument("--num-blocks", type=int, default=None, help="KV blocks (default: the engine's sizing)")
    real.add_argument("--slo-tpot-ms", type=float, default=None)
    real.add_argument("--slo-prefill-chunk", type=int, default=None)
    real.add_argument("--max-num-batched-tokens", type=int, default=None)
    real.add_argument("--step-trace", default=None, help="the core's step trace (JSON lines)")
    real.add_argument("--device-base-ms", type=float, default=H200_QWEN3_06B_BASE_MS,
                      help="emulated device time of a step: this ...")
    real.add_argument("--device-us-per-token", type=float, default=H200_QWEN3_06B_US_PER_TOKEN,
                      help="... plus this per new token ...")
    real.add_argument("--device-us-per-context-token", type=float, default=H200_QWEN3_06B_US_PER_CONTEXT_TOKEN,
                      help="... plus this per KV token read (defaults: W3 on an H200, Qwen3-0.6B)")
    real.add_argument("--prior-gpu", default=None, metavar="GPU",
                      help="the step-time model's prior as the whole preset's on this GPU of the planner's catalog "
                           "(e.g. H200; default: the CPU's, which prices a step far above an --slo-tpot-ms target)")
    real.add_argument("--core-timing", default=None, metavar="PATH",
                      help="the core thread's CPU time per loop iteration, written here on shutdown")
    return p


def _real_core(ns):
    """EngineArgs and core factory of --real-core."""
    from meshserve.bench.real_core import EmulatedDevice, real_core_factory
    from meshserve.config import EngineArgs

    extra = {k: v for k, v in (("slo_prefill_chunk", ns.slo_prefill_chunk), ("tokenizer", ns.tokenizer),
                               ("max_num_batched_tokens", ns.max_num_batched_tokens)) if v is not None}
    args = EngineArgs(model=ns.real_core, load_format="dummy", hf_overrides={"num_hidden_layers": ns.real_core_layers},
                      device="cpu", max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                      slo_ttft_ms=ns.slo_ttft_ms, slo_tpot_ms=ns.slo_tpot_ms, step_trace=ns.step_trace,
                      num_gpu_blocks_override=ns.num_blocks, **extra)
    device = EmulatedDevice(ns.device_base_ms / 1e3, ns.device_us_per_token / 1e6,
                            ns.device_us_per_context_token / 1e6)
    return args, real_core_factory(device, ns.core_timing, ns.prior_gpu)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.prior_gpu:
        from meshserve.errors import InvalidArgumentError
        from meshserve.planner.hardware import get_gpu

        try:
            get_gpu(ns.prior_gpu)
        except InvalidArgumentError as e:
            parser.error(str(e))
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("meshserve").setLevel(logging.WARNING)
    from meshserve.bench.fake_core import fake_core_factory
    from meshserve.config import EngineArgs
    from meshserve.serve.api_server import HttpOptions, serve_api_processes, serve_one_process
    from meshserve.serve.cli import bind_listen_socket
    from meshserve.serve.config import ServeConfig

    if ns.real_core:
        args, factory = _real_core(ns)
    else:
        model = {"model": ns.model, "tokenizer": ns.tokenizer, "load_format": "dummy"} if ns.model else {}
        args = EngineArgs(device="cpu", max_model_len=ns.max_model_len, max_num_seqs=ns.max_num_seqs,
                          slo_ttft_ms=ns.slo_ttft_ms, **model)
        factory = fake_core_factory(ns.step_ms / 1e3, ns.max_num_seqs)
    config = ServeConfig(served_model_names=["fake"], max_queue_len=ns.max_queue_len, drain_timeout_s=5.0,
                         gc_freeze=not ns.no_gc_freeze)
    opts = HttpOptions(ns.host, ns.port, "warning", access_log=False)

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
