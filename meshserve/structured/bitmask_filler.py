"""One step's grammar masks, filled in one batched call into a preallocated host buffer.

The per-row loop (bitmask.fill_bitmasks, the reference) pays a Python-to-C++ call and a tensor hand-over
per row, and a torch.cat and a pageable copy after it (the copy of pageable memory can make the host wait
for the device). Here xgrammar's BatchGrammarMatcher fills every constrained row of a [rows, words] int32
buffer in one call (one thread by default: 0.2 ms for 64 rows of the person schema over SmolLM2's 49,152
tokens on 2 cores, where 2 threads took longer; meshserve.bench.grammar_host measures other counts),
unconstrained rows are set to allow everything without asking a matcher, and the buffer is pinned when the
masks go to a GPU, so the one copy of the batch is asynchronous. Two buffers are used in turn: a step's copy may still read its buffer
while the next step's masks are filled (a step's copy is done once it was read back, two steps later at
the latest, as the engine keeps at most one step in flight when it fills masks in process).
"""

from __future__ import annotations

import torch

from meshserve.structured.bitmask import ALLOW_ALL


class BitmaskFiller:
    """Fills a step's masks: fill([matcher or None per sampling row]) -> [rows, words] int32 host tensor (a
    view of one of the buffers, valid until the fill after next)."""

    def __init__(self, vocab_size: int, pin_memory: bool = False, threads: int = 1, num_buffers: int = 2):
        import xgrammar as xgr

        self.words = (vocab_size + 31) // 32
        self.pin_memory = pin_memory
        self.threads = threads
        self._batch = xgr.BatchGrammarMatcher(self.threads)
        self._buffers: list[torch.Tensor | None] = [None] * num_buffers
        self._turn = 0

    def _buffer(self, rows: int) -> torch.Tensor:
        self._turn = (self._turn + 1) % len(self._buffers)
        buf = self._buffers[self._turn]
        if buf is None or buf.shape[0] < rows:
            size = max(rows, 64 if buf is None else 2 * buf.shape[0])
            buf = torch.empty(size, self.words, dtype=torch.int32, pin_memory=self.pin_memory)
            self._buffers[self._turn] = buf
        return buf

    def fill(self, matchers: list) -> torch.Tensor:
        """Row i: what matchers[i] allows next (None: everything)."""
        buf = self._buffer(len(matchers))
        out = buf[: len(matchers)]
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if len(rows) < len(matchers):
            out.fill_(ALLOW_ALL)
        if rows:
            # the full buffer, so the row indices address it (xgrammar checks them against its rows)
            self._batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], buf, rows)
        return out
