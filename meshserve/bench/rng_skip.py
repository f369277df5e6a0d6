"""Advance Python's `random` past draws without making them one by one.

A workload defined as "seed, then every prompt's ids, then the arrival gaps" (W3: bench/serve_bench.py) fixes its
arrivals through the ids drawn before them; something that needs the arrivals only (the simulator's trace) must
still move the generator past ~1.5 M `randint` calls at 96 QPS (~1-2 s of Python). The same Mersenne Twister words
come from numpy's MT19937 in bulk, put through CPython's rejection rule for `randint` (`_randbelow_with_getrandbits`:
the word's top k bits, k = the range's bit length, drawn again while >= the range), and the generator is left
where the calls would have left it.
"""

from __future__ import annotations

import random

import numpy as np


def skip_randints(count: int, low: int, high: int, rng: random.Random | None = None) -> None:
    """Leave rng (default: the module's generator) as `count` calls of rng.randint(low, high) would."""
    gen = rng if rng is not None else random  # the module has getstate / setstate too
    width = high - low + 1
    bits = width.bit_length()
    if not 0 < bits <= 32:  # wider ranges take several words a draw (getrandbits(k > 32)): not modelled here
        raise ValueError(f"skip_randints covers ranges of 1 to 2**32 - 1 values, not {width}")
    chunk = int(count / (width / (1 << bits)) * 1.05) + 64  # words a pass: one pass nearly always
    version, internal, gauss = gen.getstate()
    mt = np.random.MT19937()
    mt.state = {"bit_generator": "MT19937", "state": {"key": np.array(internal[:-1], dtype=np.uint32),
                                                      "pos": internal[-1]}}
    start = mt.state
    words, accepted = 0, 0  # how many words the calls take: up to and including the count-th accepted one
    while accepted < count:
        ok = (mt.random_raw(chunk) >> (32 - bits)) < width
        hits = np.flatnonzero(ok)
        if accepted + len(hits) >= count:
            words += int(hits[count - accepted - 1]) + 1
            break
        accepted += len(hits)
        words += chunk
    mt.state = start
    mt.random_raw(words)
    state = mt.state["state"]
    gen.setstate((version, tuple(int(w) for w in state["key"]) + (int(state["pos"]),), gauss))
