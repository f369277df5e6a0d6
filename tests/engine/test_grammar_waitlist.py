"""engine/grammar_waitlist.py: a request whose grammar cannot compile is answered, with the compile's own
InvalidArgumentError where it already is one (e.g. no importable xgrammar: structured/grammar.grammar_backend)."""

from __future__ import annotations

import concurrent.futures
from types import SimpleNamespace

from meshserve.engine.grammar_waitlist import GrammarWaitlist
from meshserve.errors import InvalidArgumentError


class _FailingCompiler:
    def __init__(self, error: Exception):
        self.error = error

    def submit(self, params):
        fut = concurrent.futures.Future()
        fut.set_exception(self.error)
        return fut


def _seq(seq_id: str):
    return SimpleNamespace(seq_id=seq_id, params=SimpleNamespace(structured_outputs=object()))


def test_a_compile_that_is_already_the_answer_is_passed_on_as_is():
    unavailable = InvalidArgumentError("structured outputs are unavailable on this server: ...", param="response_format")
    waitlist = GrammarWaitlist(_FailingCompiler(unavailable))
    waitlist.add(_seq("a"))
    ready, failed = waitlist.pop_ready()
    assert ready == [] and len(failed) == 1 and failed[0][1] is unavailable and len(waitlist) == 0


def test_any_other_compile_failure_is_reported_as_the_constraint_failing():
    waitlist = GrammarWaitlist(_FailingCompiler(RuntimeError("parser says no")))
    waitlist.add(_seq("b"))
    _, failed = waitlist.pop_ready()
    assert isinstance(failed[0][1], InvalidArgumentError)
    assert "failed to compile: parser says no" in str(failed[0][1]) and failed[0][1].param == "structured_outputs"
