"""Progress of a GGUF conversion: every phase shows, so no part of it is seconds of silence.

Reading the GGUF's metadata and building the tokenizer take as long as dequantizing the tensors (seconds each
for a 135M model), so the bar names the phase it is in, not only the tensor count. On a terminal that is one
tqdm bar on stderr; anywhere else (a log file, a pipe) an INFO line per phase and per quarter of the tensors.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)

_LOG_EVERY = 0.25  # fraction of the tensors between two log lines, when there is no bar


def _on_terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class ConversionProgress:
    def __init__(self, name: str, enabled: bool = True):
        self.name = name
        self._bar = None
        self._log = enabled and not _on_terminal()
        self._total = self._done = 0
        self._next_log = _LOG_EVERY
        if enabled and not self._log:
            from tqdm.auto import tqdm

            self._bar = tqdm(desc=f"Converting {name}", unit="tensor", file=sys.stderr, dynamic_ncols=True)

    def phase(self, what: str) -> None:
        """A phase begins (e.g. 'reading the GGUF'): named now, while it runs."""
        if self._bar is not None:
            self._bar.set_postfix_str(what)
        elif self._log:
            logger.info("Converting %s: %s", self.name, what)

    def set_tensors(self, total: int) -> None:
        self._total = total
        if self._bar is not None:
            self._bar.total = total
            self._bar.refresh()

    def tensor_done(self) -> None:
        self._done += 1
        if self._bar is not None:
            self._bar.update(1)
        elif self._log and self._total and self._done >= self._next_log * self._total:
            logger.info("Converting %s: %d/%d tensors", self.name, self._done, self._total)
            while self._next_log * self._total <= self._done:
                self._next_log += _LOG_EVERY

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
