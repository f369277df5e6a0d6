"""Requests whose grammar is still compiling: held outside the scheduler until it is ready.

The scheduler never sees a request it could not run, so a slow compile holds back only its own request,
never the queue behind it nor the running batch. Ready requests leave in arrival order with their matcher.
"""

from __future__ import annotations

import concurrent.futures
import logging

from meshserve.engine.sequence import Sequence
from meshserve.errors import InvalidArgumentError
from meshserve.structured.compiler import GrammarCompiler
from meshserve.structured.grammar import native_message

logger = logging.getLogger(__name__)


class GrammarWaitlist:
    def __init__(self, compiler: GrammarCompiler):
        self.compiler = compiler
        self._waiting: dict[str, tuple[Sequence, concurrent.futures.Future]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, seq: Sequence) -> None:
        self._waiting[seq.seq_id] = (seq, self.compiler.submit(seq.params.structured_outputs))

    def remove(self, seq_id: str) -> None:
        self._waiting.pop(seq_id, None)

    def wait(self, timeout_s: float) -> None:
        """Block until some grammar is ready or timeout_s passes (a core with nothing else to do)."""
        if self._waiting:
            concurrent.futures.wait([f for _, f in self._waiting.values()], timeout_s,
                                    concurrent.futures.FIRST_COMPLETED)

    def pop_ready(self) -> tuple[list[Sequence], list[tuple[Sequence, InvalidArgumentError]]]:
        """(sequences whose grammar compiled, each with its matcher; sequences whose compile failed)."""
        import xgrammar as xgr

        ready, failed = [], []
        for seq_id, (seq, fut) in list(self._waiting.items()):
            if not fut.done():
                continue
            del self._waiting[seq_id]
            try:
                seq.grammar = xgr.GrammarMatcher(fut.result())
                ready.append(seq)
            except Exception as e:  # noqa: BLE001 - the front end checked the spec; report, never crash
                logger.warning("grammar of %s failed to compile: %s", seq_id, e)
                failed.append((seq, InvalidArgumentError(
                    f"the structured output constraint failed to compile: {native_message(e)}",
                    param="structured_outputs")))
        return ready, failed
