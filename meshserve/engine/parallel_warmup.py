"""The start-up's Triton compiles done in parallel on a cold cache (issue 29), ahead of the warm-ups.

Plain path (MESHSERVE_PARALLEL_COMPILE=0): the profile run, ModelRunner.warm_up_prefill (fresh prefills, eager
step variants, the draft model) and the graph captures each compile the specializations they meet, one after
another, in the engine's thread. Fast path (the default since 2026-12-02: Llama-3.1-8B `serve` on an empty
Triton cache ready in 22.6-23.8 s against 32.6 s plain on the H200; KernelSelection.parallel_compile_workers): before the
profile run, and again before the warm-ups, the same forward steps run once with their Triton launches
deferred (kernels/parallel_compile.py): every new specialization's compile goes to a thread pool, nothing
launches, and the pass waits for the pool. The plain warm-ups and captures then run unchanged and find those
kernels built; what the pass did not reach they compile as before, so the pass only moves compiles earlier.

What the pass runs, and why it may skip the kernels: forward steps whose inputs the host builds (token ids,
positions, block tables, slots) and whose shapes do not depend on any kernel's output. One rank only: with
expert parallelism the MoE dispatch indexes with the (skipped) router's expert ids and syncs on their counts,
and pipeline stages exchange activations. Not in the pass: the sampling warm-up (its torch paths gather with
sampled ids a skipped kernel would have written); its few kernels compile as before.

With MESHSERVE_PARALLEL_COMPILE=procs the compiles run in worker processes (kernels/process_compile_pool.py),
started with the runner (prestart: their imports overlap the weights' load) and ended after the warm-ups.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from meshserve.kernels.parallel_compile import CompilePass, compile_in_parallel

logger = logging.getLogger(__name__)


def parallel_compile_applies(workers: int, device_type: str, world_size: int) -> bool:
    """Whether the pass runs: switched on (workers > 0), on a CUDA device, and one rank (see the module)."""
    if workers <= 0 or device_type != "cuda":
        return False
    if world_size > 1:
        logger.info("parallel Triton pre-compile is for one rank; %d ranks compile as before", world_size)
        return False
    return True


def precompile(steps: Callable[[], object], workers: int, what: str, model=None,
               processes: bool = False) -> CompilePass | None:
    """compile_in_parallel(steps), or None when it fails (logged): the plain warm-ups compile as always. The
    model's expert-load counts (FusedMoE.expert_load, counted by torch routing in the forward) are put back
    as they were: the pass leaves no trace beside its kernels."""
    counts = [] if model is None else [b for name, b in model.named_buffers() if name.endswith("expert_load")]
    saved = [b.clone() for b in counts]
    try:
        return compile_in_parallel(steps, workers, what, processes)
    except Exception:
        logger.exception("parallel Triton pre-compile of %s failed; the warm-ups compile instead", what)
        return None
    finally:
        for buffer, before in zip(counts, saved):
            buffer.copy_(before)


def cache_looks_cold(profile_pass: CompilePass | None) -> bool:
    """Whether the warm-up pass is worth its cost (one more run of every warm-up step's forward, ~1-3 s of
    Python for an 8B): the profile step's pass compiled something, or there was none to tell. When all its
    kernels came from the disk cache, the warm-ups' likely will too; any that do not compile as before."""
    if profile_pass is None or profile_pass.compiled > 0:
        return True
    logger.info("the profile step's %d Triton kernels all came from the disk cache: no parallel pass for the "
                "warm-ups (a warm cache)", profile_pass.submitted)
    return False


def warm_up_steps(runner, num_blocks: int, graph_holders: list) -> Callable[[], None]:
    """The kernel-reaching steps of the runner's start-up after the KV pool is allocated: warm_up_prefill's
    (fresh prefills, eager step variants, the draft model) and each graph holder's eager run of its capture
    inputs (DecodeGraphs / MixedStepGraphs.warm_up)."""

    def steps() -> None:
        runner.warm_up_prefill(num_blocks)
        for holder in graph_holders:
            holder.warm_up()

    return steps
