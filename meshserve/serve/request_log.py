"""`meshserve serve --request-log FILE`: one JSON line per served prompt, the arrival trace of real traffic.

Each line holds the request's arrival (Unix seconds, from its first ASGI call), the prompt's tokens and the
tokens generated for it (the most of its n choices), its outcome, TTFT and end-to-end seconds. The keys are
the ones `meshserve simulate --trace FILE` reads (simulator/trace.py file_trace: timestamp, prompt_tokens,
output_tokens), so the server's own traffic can be replayed on a simulated fleet of another size. Only
requests that finished (stop or length) are written: a refused or aborted request never had its lengths
decided, so a log of an overloaded server under-counts the arrivals (its 429s are in /metrics).
Every API process appends to the same file; a line is one write() of an O_APPEND file, so lines do not mix.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class RequestLog:
    """Appends one line per served prompt to path (created if absent)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, arrival_unix_s: float, prompt_tokens: int, output_tokens: int, outcome: str,
              ttft_s: float | None, e2e_s: float) -> None:
        row = {"timestamp": round(arrival_unix_s, 6), "prompt_tokens": prompt_tokens,
               "output_tokens": output_tokens, "outcome": outcome,
               "ttft_s": None if ttft_s is None else round(ttft_s, 6), "e2e_s": round(e2e_s, 6)}
        os.write(self._fd, (json.dumps(row, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def unix_time_of(perf_counter_s: float) -> float:
    """The wall-clock time of a time.perf_counter() reading taken earlier in this process."""
    return time.time() - (time.perf_counter() - perf_counter_s)
