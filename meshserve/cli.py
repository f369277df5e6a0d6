"""`meshserve` command line: generate, serve, run-batch, plan, bench, router and simulate."""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import importlib
import logging
import signal
import sys

from meshserve import __version__
from meshserve.cli_argv import normalize_argv
from meshserve.cli_args import (
    add_engine_args,
    add_sampling_args,
    apply_defaults_help,
    engine_args_from,
    sampling_params_from,
)
from meshserve.engine.args_check import check_engine_args
from meshserve.errors import InvalidArgumentError, MeshserveError


def _cmd_generate(ns: argparse.Namespace) -> int:
    # validate flags and prompts before importing torch or loading anything
    sampling_params_from(ns)
    if any(not p for p in ns.prompts):
        raise InvalidArgumentError("a prompt is empty", param="prompt")
    engine_args = engine_args_from(ns)
    check_engine_args(engine_args)
    from meshserve.engine.early_tokenizer import has_no_tokenizer

    if has_no_tokenizer(engine_args):  # a preset or config.json on dummy weights: no text to encode prompts with
        raise InvalidArgumentError(
            f"--model {engine_args.model} with --load-format dummy has no tokenizer for text prompts: pass "
            "--tokenizer DIR (e.g. one written by `meshserve bench tokenizer DIR --model PRESET`)", param="tokenizer")

    from meshserve.entrypoints.llm import LLM
    from meshserve.entrypoints.worker import is_rank_zero, run_worker_ranks

    if not is_rank_zero(engine_args):  # another node's ranks: serve the model shards only
        return run_worker_ranks(engine_args)
    llm = LLM(**vars(engine_args))
    params = sampling_params_from(ns, llm.generation_defaults)  # unset flags: the model's defaults, as serve
    tokenizer = llm.get_tokenizer()
    use_chat = ns.chat if ns.chat is not None else bool(tokenizer is not None and tokenizer.chat_template)
    if use_chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in ns.prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(ns.prompts, params, use_tqdm=False)
    for prompt, out in zip(ns.prompts, outputs):
        for completion in out.outputs:
            if len(ns.prompts) > 1 or len(out.outputs) > 1:
                print(f"--- {prompt!r} [{completion.index}] ({completion.finish_reason})")
            print(completion.text.strip() if use_chat else completion.text)
            if completion.logprobs is not None:
                _print_logprobs(completion)
    llm.shutdown()
    return 0


def _print_logprobs(completion) -> None:
    """One line per generated token: its text and logprob, then the alternatives by rank."""
    for token_id, position in zip(completion.token_ids, completion.logprobs):
        chosen = position[token_id]
        others = sorted((lp for tid, lp in position.items() if tid != token_id), key=lambda lp: lp.rank or 0)
        alts = "  ".join(f"{lp.decoded_token!r} {lp.logprob:.3f}" for lp in others)
        print(f"  {chosen.decoded_token!r} {chosen.logprob:.3f}" + (f"   | {alts}" if alts else ""))


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


# the subcommands registered by other modules, and each one's module (its register(subparsers))
_SUBCOMMAND_MODULES = {"serve": "meshserve.serve.cli", "plan": "meshserve.planner.cli",
                       "bench": "meshserve.bench.cli", "router": "meshserve.router.cli",
                       "simulate": "meshserve.simulator.cli", "run-batch": "meshserve.entrypoints.run_batch_cli"}


def _command_named(argv: list[str]) -> str | None:
    """The subcommand argv names (its first word past the top-level options), if it is one of the above."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    return argv[i] if i < len(argv) and argv[i] in _SUBCOMMAND_MODULES else None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line's parser; with argv (the arguments about to be parsed) naming one of
    _SUBCOMMAND_MODULES, only that one's: importing every subcommand's module (the benchmarks', the planner's,
    numpy) takes ~0.5 s of a 2-core CPU, before `meshserve serve` even starts its engine core."""
    only = _command_named(argv) if argv is not None else None
    parser = argparse.ArgumentParser(prog="meshserve", description="meshserve LLM inference engine")
    parser.add_argument("--version", action="version", version=f"meshserve {__version__}")
    parser.add_argument("--log-level", default="WARNING", type=str.upper,
                        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"), metavar="LEVEL",
                        help="DEBUG, INFO, WARNING, ERROR or CRITICAL")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for prompts (offline, in-process)")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                     help="wrap prompts in the chat template (default: when the tokenizer has one)")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=_cmd_generate)
    for name, module in _SUBCOMMAND_MODULES.items():
        if only is None or name == only:
            importlib.import_module(module).register(sub)
    apply_defaults_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    # vLLM's --max_model_len and --compilation-config.mode 3 spellings, as its parser takes them
    argv = normalize_argv(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    ns.argv = argv  # `serve --config FILE` parses the command line again, over the file's flags
    logging.basicConfig(level=getattr(logging, ns.log_level.upper(), logging.WARNING),
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # SIGTERM unwinds like Ctrl-C, so executors shut their worker processes down (no orphans)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    # `kill -USR1 PID` prints every thread's Python stack: where a hung process waits
    with contextlib.suppress(AttributeError, ValueError, OSError):  # stderr without a file descriptor
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        return ns.func(ns)
    except MeshserveError as e:
        print(f"meshserve: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
