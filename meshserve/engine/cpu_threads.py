"""How many threads torch may use for one rank on a CPU.

torch takes every core by default; with several ranks on one machine, or other work beside the engine, its
OpenMP threads then wait on each other's cores and a step can take ten times longer. The choice: the cores
this process may run on, shared by the local ranks, less the cores other processes keep busy (the load
average at start-up), at least one. OMP_NUM_THREADS, when set, wins.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)


def choose_cpu_threads(ranks_per_node: int = 1) -> tuple[int, str]:
    """(threads, why) for one rank."""
    explicit = os.environ.get("OMP_NUM_THREADS")
    if explicit and explicit.isdigit() and int(explicit) > 0:
        return int(explicit), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    share = max(1, cores // max(1, ranks_per_node))
    busy_elsewhere = int(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    free = max(1, cores - busy_elsewhere) // max(1, ranks_per_node)
    threads = max(1, min(share, free))
    return threads, f"{cores} cores, {ranks_per_node} local rank(s), load average {os.getloadavg()[0]:.1f}"


def set_cpu_threads(ranks_per_node: int = 1) -> int:
    import torch

    threads, why = choose_cpu_threads(ranks_per_node)
    torch.set_num_threads(threads)
    logger.info("CPU: %d torch thread(s) per rank (%s)", threads, why)
    return threads
