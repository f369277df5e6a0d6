"""serve/structured_request.py: which requests may parse a grammar, and xgrammar's first import off the loop."""

from __future__ import annotations

import asyncio
import sys
import threading

import pytest

from meshserve.serve import structured_request
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest

TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("fields,needs", [
    ({}, False),
    ({"response_format": {"type": "text"}}, False),
    ({"response_format": {"type": "json_object"}}, True),
    ({"structured_outputs": {"regex": "[ab]+"}}, True),
    ({"guided_choice": ["a", "b"]}, True),
    ({"guided_json": {"type": "object"}}, True),
])
def test_may_need_grammar_by_field(fields, needs):
    assert structured_request.may_need_grammar(CompletionRequest(model="m", prompt="hi", **fields)) is needs
    assert structured_request.may_need_grammar(ChatCompletionRequest(model="m", messages=MESSAGES, **fields)) is needs


def test_tools_may_need_grammar():
    assert structured_request.may_need_grammar(ChatCompletionRequest(model="m", messages=MESSAGES, tools=[TOOL]))
    assert not structured_request.may_need_grammar(ChatCompletionRequest(model="m", messages=MESSAGES, tools=[]))


def test_first_import_runs_on_a_worker_thread_once_needed(monkeypatch):
    imported = []

    def fake_import(name):
        imported.append((name, threading.current_thread() is threading.main_thread()))
        monkeypatch.setitem(sys.modules, name, object())  # as a real import leaves it (undone after the test)

    monkeypatch.setattr(structured_request.importlib, "import_module", fake_import)
    monkeypatch.delitem(sys.modules, "xgrammar", raising=False)
    plain = CompletionRequest(model="m", prompt="hi")
    constrained = CompletionRequest(model="m", prompt="hi", guided_regex="[ab]+")
    asyncio.run(structured_request.import_grammar_backend(plain))
    assert imported == []  # free text never pays for it
    asyncio.run(structured_request.import_grammar_backend(constrained))
    assert imported == [("xgrammar", False)]  # not on the event loop's thread
    asyncio.run(structured_request.import_grammar_backend(constrained))
    assert len(imported) == 1  # imported already: nothing more


def test_a_missing_backend_is_left_to_the_check(monkeypatch):
    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(structured_request.importlib, "import_module", missing)
    monkeypatch.delitem(sys.modules, "xgrammar", raising=False)
    asyncio.run(structured_request.import_grammar_backend(CompletionRequest(model="m", prompt="x", guided_regex="a")))
