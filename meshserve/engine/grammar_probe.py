"""MESHSERVE_GRAMMAR_PROBE: a device A/B of what constrained decoding costs a step, by parts. Off by default.

Constrained requests keep their path through the engine (compile, waitlist, the late-mask hook that reads the
step in flight back inside the next launch), but the grammar's own work is left out, so their outputs are NOT
constrained (a random model's answers then run to max_tokens: compare with free answers of that length):
- "no_matchers": no matcher accepts tokens or fills masks; every row's mask allows all tokens, still copied to
  the device and applied there (the hook's order, the copy and the apply kernel, without xgrammar's host work);
- "no_masks": as no_matchers, and no mask at all (the hook's order alone).
The schema run's time per token minus a probe run's is then the part the probe left out.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

PROBES = ("no_matchers", "no_masks")


def grammar_probe() -> str | None:
    """The probe MESHSERVE_GRAMMAR_PROBE asks for, or None (off; an unknown value is refused)."""
    value = os.environ.get("MESHSERVE_GRAMMAR_PROBE", "").strip()
    if not value:
        return None
    if value not in PROBES:
        raise ValueError(f"MESHSERVE_GRAMMAR_PROBE must be one of {PROBES}, got {value!r}")
    logger.warning("MESHSERVE_GRAMMAR_PROBE=%s: constrained outputs are NOT constrained (a cost probe)", value)
    return value
