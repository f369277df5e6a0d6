"""How much faster N Triton specializations compile through kernels/parallel_compile.py than in sequence.

usage: python tools/parallel_compile_probe.py [N=32] [THREADS=1,4,16]

Runs Triton's real JITFunction launch path with deferred launches (nothing runs on a device) and a stand-in
driver (an sm_90 target, CPU tensors as arguments), so it needs a Triton with the NVIDIA backend (ptxas) but
no GPU: first N specializations one after another (Triton's plain path, as a cold start-up compiles), then N
others through compile_in_parallel at each thread count. Each run uses an empty TRITON_CACHE_DIR. Also checks
what the engine relies on: after the pass every specialization is in the kernel's in-memory cache (no build on
the next launch). Prints one line per run.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver

from meshserve.kernels.parallel_compile import compile_in_parallel, deferred_launches


@triton.jit
def _tile_matmul(a_ptr, b_ptr, c_ptr, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 SCALE: tl.constexpr):
    # a small GEMM tile loop: a typical compile (MLIR pipelines, LLVM, ptxas) of ~0.3-1 s
    rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * BN + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BN + rn[None, :], (acc * SCALE).to(tl.bfloat16))


class _StandInDriver:
    """What JITFunction.run asks of the driver before a warmup launch: a device, a stream, a target."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def _launch_all(scales, a, b, c):
    for s in scales:
        _tile_matmul[(1,)](a, b, c, 256, BM=64, BN=64, BK=64, SCALE=s)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 32
    thread_counts = [int(t) for t in (sys.argv[2] if len(sys.argv) > 2 else "1,4,16").split(",")]
    driver.set_active(_StandInDriver())
    builds = []
    knobs.runtime.jit_cache_hook = lambda **kw: builds.append(kw["key"]) and None
    a = torch.zeros(64 * 256, dtype=torch.bfloat16)
    b, c = a.clone(), torch.zeros(64 * 64, dtype=torch.bfloat16)
    knobs.cache.dir = tempfile.mkdtemp()
    with deferred_launches():
        _launch_all([0.125], a, b, c)  # one-time set-up (dialects, ptxas version) outside the timings
    knobs.cache.dir = tempfile.mkdtemp()
    t0 = time.perf_counter()
    with deferred_launches():  # no AsyncCompileMode: each launch compiles in this thread
        _launch_all([1.0 + i for i in range(n)], a, b, c)
    sequential = time.perf_counter() - t0
    print(f"triton {triton.__version__}, {os.cpu_count()} cores: {n} specializations one after another "
          f"{sequential:.2f} s", flush=True)
    for i, threads in enumerate(thread_counts):
        knobs.cache.dir = tempfile.mkdtemp()
        scales = [1000.0 * (i + 1) + j for j in range(n)]
        done = compile_in_parallel(lambda s=scales: _launch_all(s, a, b, c), threads, "probe")
        before = len(builds)
        with deferred_launches():
            _launch_all(scales, a, b, c)
        speedup = sequential / done.seconds
        print(f"  {threads:3d} threads: {done.seconds:.2f} s ({speedup:.1f}x), "
              f"{done.submitted} submitted, {len(builds) - before} built again on the next launch",
              flush=True)


if __name__ == "__main__":
    main()
