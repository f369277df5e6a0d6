"""`meshserve bench {latency,throughput,serve}`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    bench = sub.add_parser("bench", help="benchmarks: the workloads W1-W3 (latency, throughput, serve) and the "
                                         "engine's parts (host, channel, ...)")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from meshserve.bench.offline import add_offline_parsers

    add_offline_parsers(bench_sub)
    from meshserve.bench.host_overhead import add_host_parser

    add_host_parser(bench_sub)
    from meshserve.bench.channel import add_channel_parser

    add_channel_parser(bench_sub)
    from meshserve.bench.all_reduce import add_all_reduce_parser

    add_all_reduce_parser(bench_sub)
    from meshserve.bench.word_tokenizer import add_tokenizer_parser

    add_tokenizer_parser(bench_sub)
    from meshserve.bench.frontend import add_frontend_parser

    add_frontend_parser(bench_sub)
    from meshserve.bench.spec_decode import add_spec_parser

    add_spec_parser(bench_sub)
    from meshserve.bench.structured_outputs import add_structured_parser

    add_structured_parser(bench_sub)
    try:
        from meshserve.bench.serve_bench import add_serve_parser
    except ImportError:  # the serving benchmark is optional until its module exists
        return
    add_serve_parser(bench_sub)
