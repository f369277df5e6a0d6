"""Keep Python's garbage collector from stalling a loaded API process.

An API process holds ~240k container objects once torch, transformers, FastAPI and the tokenizer are imported.
Under load its per-token allocations trigger full (generation 2) collections every few seconds, and each one
walks that whole start-up heap with the GIL held: 100-360 ms on the 2-core CPU machine, during which the event
loop answers nothing (refusals included) and no token leaves. Start-up objects live as long as the process, so
they are collected once and then frozen (moved to the permanent generation, which collections skip), as vLLM
does; later collections walk only what requests allocate.
"""

from __future__ import annotations

import gc
import logging
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
