"""Run a test's ranks as the engine starts its own (process_start: a forkserver with torch imported once), wait for
all of them, or for the first to fail (the others may wait for it in a collective: they are killed)."""

from __future__ import annotations

import time
from collections.abc import Callable

from meshserve.distributed import process_start


def run_ranks(target: Callable, args_of: Callable[[int], tuple], world_size: int = 2,
              timeout_s: float = 120.0) -> list[int | None]:
    """target(*args_of(rank)) in each of world_size processes; their exit codes (None: killed at the timeout)."""
    ranks = [process_start.new_process(target, args_of(rank)) for rank in range(world_size)]
    for p in ranks:
        p.start()
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in ranks) and not any(p.exitcode for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    codes = [p.exitcode for p in ranks]
    for p in ranks:
        if p.is_alive():
            p.kill()
        p.join()
    return codes
