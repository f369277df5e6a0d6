"""Requests whose grammar is still compiling: held outside the scheduler until it is ready.

The scheduler never sees a request it could not run, so a slow compile holds back only its own request,
never the queue behind it nor the running batch. Ready requests leave in arrival order with their matcher;
one whose grammar is not ready within compile_timeout_s is refused (the compile thread cannot be stopped,
but the request is answered rather than left hanging).
"""

from __future__ import annotations

import concurrent.futures
import logging
import time

from meshserve.engine.sequence import Sequence
from meshserve.errors import InvalidArgumentError
from meshserve.structured.compiler import GrammarCompiler
from meshserve.structured.grammar import native_message

logger = logging.getLogger(__name__)


class GrammarWaitlist:
    def __init__(self, compiler: GrammarCompiler, compile_timeout_s: float = 60.0):
        self.compiler = compiler
        self.compile_timeout_s = compile_timeout_s
        self._waiting: dict[str, tuple[Sequence, concurrent.futures.Future, float]] = {}

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, seq: Sequence) -> None:
        self._waiting[seq.seq_id] = (seq, self.compiler.submit(seq.params.structured_outputs), time.monotonic())

    def remove(self, seq_id: str) -> None:
        self._waiting.pop(seq_id, None)

    def wait(self, timeout_s: float) -> None:
        """Block until some grammar is ready or timeout_s passes (a core with nothing else to do)."""
        if self._waiting:
            concurrent.futures.wait([f for _, f, _ in self._waiting.values()], timeout_s,
                                    concurrent.futures.FIRST_COMPLETED)

    def pop_ready(self) -> tuple[list[Sequence], list[tuple[Sequence, InvalidArgumentError]]]:
        """(sequences whose grammar compiled, each with its matcher; sequences whose compile failed)."""
        ready, failed = [], []
        now = time.monotonic()
        for seq_id, (seq, fut, since) in list(self._waiting.items()):
            if not fut.done():
                if now - since > self.compile_timeout_s:
                    del self._waiting[seq_id]
                    failed.append((seq, InvalidArgumentError(
                        f"the structured output constraint did not compile within {self.compile_timeout_s:g} s",
                        param="structured_outputs")))
                continue
            del self._waiting[seq_id]
            try:
                compiled = fut.result()
                import xgrammar as xgr  # here, not per step: a core without grammar requests never imports it

                seq.grammar = xgr.GrammarMatcher(compiled)
                seq.grammar_stop_ids = frozenset(compiled.tokenizer_info.stop_token_ids)
                seq.grammar_after_token = seq.params.structured_outputs.reasoning_end_token_id
                ready.append(seq)
            except InvalidArgumentError as e:  # already the request's answer (no xgrammar: structured/grammar.py)
                failed.append((seq, e))
            except Exception as e:  # noqa: BLE001 - the front end checked the spec; report, never crash
                logger.warning("grammar of %s failed to compile: %s", seq_id, e)
                failed.append((seq, InvalidArgumentError(
                    f"the structured output constraint failed to compile: {native_message(e)}",
                    param="structured_outputs")))
        return ready, failed
