"""Keep Python's garbage collector from stalling a loaded API process or engine core.

An API process holds ~240k container objects once torch, transformers, FastAPI and the tokenizer are imported
(the engine core ~300k once its model is loaded). Under load its per-token allocations trigger full (generation 2) collections every few seconds, and each one
walks that whole start-up heap with the GIL held: 100-360 ms on the 2-core CPU machine, during which the event
loop answers nothing (refusals included) and no token leaves. Start-up objects live as long as the process, so
they are collected once and then frozen (moved to the permanent generation, which collections skip), as vLLM
does; later collections walk only what requests allocate.
"""

from __future__ import annotations

import gc
import logging
import os
import time

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
