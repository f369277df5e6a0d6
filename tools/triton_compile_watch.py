"""Which Triton kernel specializations a command meets after start-up (issue 29: no compile inside serving).

usage: python tools/triton_compile_watch.py -- meshserve bench throughput --model deepseek-v2-lite --no-baseline

Runs the meshserve CLI in this process with Triton's jit_cache_hook set: every kernel specialization that misses
the process's in-memory cache (a compile, or a load from the disk cache) is printed with the seconds since the
start, the phase (start: before the first LLM.generate with more than 8 prompts; serve: after), its constexpr
values and the arguments specialized as divisible by 16 (ints) or 16-byte aligned (pointers). Lines start with
'jit ' so they grep apart from the command's output.
"""

import sys
import time

import triton
from triton import knobs

T0 = time.perf_counter()
PHASE = {"now": "start"}


def _hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled):  # noqa: A002 (Triton's names)
    try:
        _print(fn, compile)
    except Exception as e:  # a Triton version with other hook data: say so, never stop the command
        print(f"jit {time.perf_counter() - T0:7.2f} {PHASE['now']:5s} {fn.name} (hook failed: {e!r})", flush=True)
    return None  # compile as usual


def _print(fn, compile):  # noqa: A002
    names = fn.jit_function.arg_names
    consts = {names[k[0]]: v for k, v in compile["constants"].items() if not callable(v)}
    # the specialized non-constexpr arguments: ints divisible by 16, pointers 16-byte aligned (a change of either
    # compiles the kernel again)
    attrs = sorted(names[k[0]] for k, v in compile["configs"][0].items() if v)
    print(f"jit {time.perf_counter() - T0:7.2f} {PHASE['now']:5s} {fn.name} warps={compile['num_warps']} "
          f"stages={compile['num_stages']} {consts} aligned/div16={attrs}", flush=True)


def main():
    argv = sys.argv[1:]
    if argv and argv[0] == "--":
        argv = argv[1:]
    if argv and argv[0] == "meshserve":
        argv = argv[1:]
    knobs.runtime.jit_cache_hook = _hook
    from meshserve.entrypoints.llm import LLM

    generate = LLM.generate

    def watched(self, prompts, *args, **kwargs):
        if isinstance(prompts, list) and len(prompts) > 8:
            PHASE["now"] = "serve"
            print(f"jit {time.perf_counter() - T0:7.2f} ---- generate({len(prompts)} prompts) starts", flush=True)
        return generate(self, prompts, *args, **kwargs)

    LLM.generate = watched
    from meshserve.cli import main as cli_main

    sys.argv = ["meshserve", *argv]
    print(f"triton {triton.__version__}", flush=True)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
