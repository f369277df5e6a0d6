"""Whether the parallel pre-compile pass costs W1 its PDL gain (issue 29; one H200, 2026-12-02: Qwen3-0.6B
`bench latency --no-baseline` 887-897 tok/s with the pass, 1,072-1,073 with MESHSERVE_PARALLEL_COMPILE=0, two
runs each). Answer, from 30 runs in the same session: no. Every variant below, the pass off included, spread
over 712-1,073 tok/s from one process to the next (BENCHMARKS.md "Twenty-first session").

usage (device, repo root): python tools/precompile_probe.py VARIANT bench latency --model qwen3-0.6b ...
VARIANT, each a patch of kernels/parallel_compile.py applied in this process before the CLI runs:
  as_is        no patch (the default path)
  no_launcher  the pool does not build the kernels' launchers (each first launch builds its own)
  inline       every compile runs in the submitting thread at submit (no pool thread touches a kernel)
  no_pass      compile_in_parallel runs nothing and reports an empty pass (the pass's side effects gone, the
               selection unchanged)
"""

import sys
import threading
from concurrent.futures import Future

from meshserve import cli
from meshserve.kernels import parallel_compile


def _inline_submit(self, fn, /, *args, **kwargs):
    future = Future()
    try:
        future.set_result(fn(*args, **kwargs))
    except BaseException as e:  # noqa: BLE001 - handed to the waiter as the pool would
        future.set_exception(e)
    return future


def main() -> int:
    variant, argv = sys.argv[1], sys.argv[2:]
    if variant == "no_launcher":
        parallel_compile.build_launcher = lambda kernel: None
    elif variant == "inline":
        parallel_compile.CompilePool.submit = _inline_submit
    elif variant == "no_pass":
        parallel_compile.compile_in_parallel = (
            lambda steps, workers, what="", processes=False: parallel_compile.CompilePass(0, 0, 0.0, workers))
        import meshserve.engine.parallel_warmup as warmup  # bound by name there

        warmup.compile_in_parallel = parallel_compile.compile_in_parallel
    elif variant != "as_is":
        raise SystemExit(f"unknown variant {variant!r}")
    print(f"precompile_probe: {variant} (thread {threading.current_thread().name})", flush=True)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
