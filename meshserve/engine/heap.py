"""Keep Python's garbage collector from stalling a loaded API process or engine core.

An API process holds ~240k container objects once torch, transformers, FastAPI and the tokenizer are imported
(the engine core ~300k once its model is loaded). Under load its per-token allocations trigger full (generation 2) collections every few seconds, and each one
walks that whole start-up heap with the GIL held: 100-360 ms on the 2-core CPU machine, during which the event
loop answers nothing (refusals included) and no token leaves. Start-up objects live as long as the process, so
they are collected once and then frozen (moved to the permanent generation, which collections skip), as vLLM
does; later collections walk only what requests allocate.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import time
from collections.abc import Iterator

logger = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect start-up garbage, then freeze every surviving object; returns how many objects are frozen."""
    t = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("froze %d start-up objects in %.0f ms", frozen, 1e3 * (time.perf_counter() - t))
    return frozen


# the engine core's young-generation threshold (Python's is 700): see young_collection_threshold
CORE_YOUNG_THRESHOLD = 20_000


def young_collection_threshold() -> int:
    """Container allocations (net of frees) between young-generation collections in the engine core:
    MESHSERVE_CORE_GC_GEN0, else CORE_YOUNG_THRESHOLD. A W3 step allocates thousands of short-lived containers
    (a row per scheduled sequence, an output per running request) that die within a step or two; at Python's
    700 the collector ran in every step of the serving core (W3 on frontend_server --real-core, CPU: 0.17 ms
    of young collections a step, and a 5.7 ms full one every ~140 steps), walking rows about to die. At
    20,000 the steady state's net growth never reaches it; garbage cycles are still collected once that many
    containers pile up."""
    value = os.environ.get("MESHSERVE_CORE_GC_GEN0")
    return int(value) if value else CORE_YOUNG_THRESHOLD


def set_young_collection_threshold(threshold: int) -> None:
    """Young collections every threshold net allocations; the older generations' ratios stay Python's."""
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(threshold, gen1, gen2)


# LLM(...)'s generate() runs the engine core in the caller's process (entrypoints/llm.py), so a full collection
# there walks every object the process holds (~190k with a tiny model on the CPU, more with a GPU's kernels and
# graphs: 50-63 ms every ~300 decode steps of batch 256 on the 2-core CPU) while the GPU runs out of launched
# work. For the run's length, what exists at its start is frozen and young collections are made rarer, as in the
# core process, then the collector is given back as it was: nothing stays frozen between runs, so an engine
# dropped without shutdown() still has its cycles collected. auto (the default): on a GPU, where the pauses
# idle the device (on the CPU the model's own time hides them); 1 everywhere; 0 never. A run that finds objects
# already frozen (the caller's own gc.freeze(), a serving process) leaves the collector alone.
OFFLINE_FREEZE_ENV = "MESHSERVE_OFFLINE_GC_FREEZE"


def offline_freeze_mode() -> str:
    """MESHSERVE_OFFLINE_GC_FREEZE: "auto", "1" or "0"; anything else is refused (InvalidArgumentError)."""
    value = os.environ.get(OFFLINE_FREEZE_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "1", "0"):
        from meshserve.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{OFFLINE_FREEZE_ENV}={value!r}: expected auto, 1 or 0", param=OFFLINE_FREEZE_ENV)
    return value


def offline_freeze_applies(device: str) -> bool:
    """Whether an in-process run on `device` freezes the heap (offline_freeze_mode)."""
    mode = offline_freeze_mode()
    return mode == "1" or (mode == "auto" and device.startswith("cuda"))


@contextlib.contextmanager
def heap_frozen_while_running(device: str) -> Iterator[bool]:
    """For the body: the objects alive at its start frozen (gc.freeze: O(1), no collection) and young
    collections every young_collection_threshold() allocations; afterwards both as before. Yields whether it
    froze."""
    if not offline_freeze_applies(device) or gc.get_freeze_count():
        yield False
        return
    before = gc.get_threshold()
    gc.freeze()
    set_young_collection_threshold(young_collection_threshold())
    try:
        yield True
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
