"""Differential fuzzing of --reasoning-parser over HTTP: a scripted model (scripted_engine.py) writes seeded
random mixtures of `<think>`, `</think>`, partial and stray tags, Hermes and XML tool calls inside and after
the thought, whitespace and unicode (reasoning_scripts.py), in random per-step chunks, finished by "stop" or
"length" (half of those cut anywhere, inside a tag or a call); requests vary tools and tool_choice, structured outputs, enable_thinking and tags in the prompt.
Five servers: qwen3 with the tags as single tokens and Hermes tools, the same with qwen3_coder (XML calls,
which end a thought implicitly), qwen3 with the tags as special tokens (the output must keep them),
deepseek_r1 on the same tokenizer, deepseek_r1 in text mode (a tokenizer without the tags), and no parser at
all (Hermes tool calls streamed through /v1/responses, tags as plain content). For every case:

- the whole chat answer's reasoning is the oracle's (reasoning_scripts.expected_split, a plain reading of the
  rules), and so is its content when no tool parser reads it; with tags as single tokens, an output inside the
  thought leaks no tag text into either field;
- chat whole and streamed agree on reasoning, content, tool calls and finish_reason;
- /v1/responses whole and streamed agree (items, statuses, usage; the stream's structure as in
  test_responses_differential.py), and equal the chat answer for the same conversation;
- what the engine is asked (reasoning_end_token_id) is the end tag's id exactly when the request has a
  constraint and its rendered prompt leaves the output inside the thought; in text mode such a request is a 400.

Found: with a named tool_choice the streams opened the call on the first delta, while still thinking (seed 1
case 21): /v1/responses then split the reasoning in two items around the call, and an output that never left
the thought streamed a call the whole answer has not (serving_chat.py, serving_responses.py); with tools, the
chat stream sent whitespace before a call as content, which the whole answer drops (coder seed 4 case 7,
tool_call_stream.py); a Hermes call followed by a malformed block ("none" seed 35 case 24) or cut by max_tokens
("none" seed 4 case 2) was all text whole but a call streamed (tool_calls.py). Each is a regular test too
(test_reasoning_served.py, test_tool_call_stream.py).
"""

from __future__ import annotations

import json

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from tests.reasoning_model import reasoning_tokenizer
from tests.serve.conftest import start_server
from tests.serve.reasoning.reasoning_scripts import (
    END,
    START,
    XML_OPEN,
    ReasoningCase,
    chat_body,
    chat_messages,
    expected_split,
    joined_calls,
    make_cases,
    prompt_in_reasoning,
    responses_body,
)
from tests.serve.reasoning.scripted_engine import ScriptedLLM
from tests.serve.responses_workload import check_stream, post_stream, summary

openai = pytest.importorskip("openai")
from openai.types.responses import Response
from pydantic import TypeAdapter

RESPONSE = TypeAdapter(Response)

# name -> (reasoning parser, tool parser, tokenizer: tags as single tokens, as special ones, or several tokens)
SERVERS = {"qwen3": ("qwen3", "hermes", "tags"), "coder": ("qwen3", "qwen3_coder", "tags"),
           "special": ("qwen3", "hermes", "special tags"), "r1": ("deepseek_r1", "hermes", "tags"),
           "text": ("deepseek_r1", "hermes", "plain"), "none": (None, "hermes", "tags")}


@pytest.fixture(scope="module")
def served(tiny_engine, tiny_model_dir):
    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tiny_model_dir("llama"))
    servers, engines = {}, {}
    tokenizers = {"tags": reasoning_tokenizer(), "special tags": reasoning_tokenizer(special=True), "plain": plain}
    for name, (reasoning, tools, vocabulary) in SERVERS.items():
        engines[name] = ScriptedLLM(tiny_engine, tokenizers[vocabulary])
        servers[name] = start_server(engines[name], ServeConfig(
            served_model_names=["m"], reasoning_parser=reasoning, enable_auto_tool_choice=True,
            tool_call_parser=tools))
    yield {k: s.base_url for k, s in servers.items()}, engines
    for s in servers.values():
        s.stop()


def _chat_stream(http: httpx.Client, url: str, body: dict) -> dict:
    out = {"reasoning": "", "content": "", "calls": {}, "finish": None}
    with http.stream("POST", url, json=dict(body, stream=True)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            for c in chunk["choices"]:
                delta = c["delta"]
                out["reasoning"] += delta.get("reasoning") or ""
                out["content"] += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    name_args = out["calls"].setdefault(call["index"], ["", ""])
                    name_args[0] += call["function"].get("name") or ""
                    name_args[1] += call["function"].get("arguments") or ""
                out["finish"] = c.get("finish_reason") or out["finish"]
    out["calls"] = [tuple(v) for _, v in sorted(out["calls"].items())]
    return out


class Case:
    """One case on one server: its scripted output replayed for each request."""

    def __init__(self, http: httpx.Client, base: str, engine: ScriptedLLM, parser: str | None, token_mode: bool,
                 case: ReasoningCase, where: str):
        self.http, self.base, self.engine, self.case, self.where = http, base, engine, case, where
        self.parser, self.token_mode = parser, token_mode
        self.qwen3 = parser == "qwen3"  # its rules: enable_thinking=False starts outside; an XML call ends the thought
        tok = engine.tokenizer
        self.tags = (tok.convert_tokens_to_ids(START), tok.convert_tokens_to_ids(END)) if token_mode else (START, END)

    def post(self, path: str, body: dict) -> httpx.Response:
        self.engine.say(self.case.output, self.case.steps, self.case.finish_reason)
        return self.http.post(self.base + path, json=body)

    def stream(self, fn, *args):
        self.engine.say(self.case.output, self.case.steps, self.case.finish_reason)
        return fn(*args)

    def in_reasoning(self, chat_template_kwargs: dict | None) -> bool:
        if self.parser is None:
            return False
        r = self.http.post(self.base + "/tokenize", json={"model": "m", "messages": chat_messages(self.case),
                                                          "chat_template_kwargs": chat_template_kwargs})
        ids = r.json()["tokens"]
        prompt = ids if self.token_mode else self.engine.tokenizer.decode(ids)
        thinking = (chat_template_kwargs or {}).get("enable_thinking") if self.qwen3 else None
        return prompt_in_reasoning(prompt, *self.tags, thinking)

    def check_engine_asked(self, in_reasoning: bool) -> None:
        asked = self.engine.params[-1].structured_outputs
        if self.case.constrained:
            assert asked is not None and asked.reasoning_end_token_id == (self.tags[1] if in_reasoning else None), \
                (self.where, in_reasoning, asked)
        else:
            assert asked is None or asked.reasoning_end_token_id is None, self.where

    def refused(self, r: httpx.Response, in_reasoning: bool) -> bool:
        """Text mode cannot defer a constraint past the thought: such a request is a 400."""
        if not self.token_mode and self.case.constrained and in_reasoning:
            assert r.status_code == 400 and "single token" in r.json()["error"]["message"], (self.where, r.text)
            return True
        assert r.status_code == 200, (self.where, r.text)
        return False

    def check_chat(self) -> dict | None:
        body = chat_body(self.case)
        in_reasoning = self.in_reasoning(body.get("chat_template_kwargs"))
        r = self.post("/v1/chat/completions", body)
        if self.refused(r, in_reasoning):
            return None
        self.check_engine_asked(in_reasoning)
        choice = r.json()["choices"][0]
        message = choice["message"]
        whole = {"reasoning": message.get("reasoning") or "", "content": message["content"] or "",
                 "calls": joined_calls(message.get("tool_calls")), "finish": choice["finish_reason"]}
        output = self.case.output
        reasoning, content = expected_split(output, in_reasoning, self.token_mode, self.qwen3) \
            if self.parser else ("", output)
        assert whole["reasoning"] == reasoning, (self.where, whole, reasoning)
        if not self.case.tools or self.case.tool_choice == "none":
            assert whole["content"] == content, (self.where, whole, content)
        inside = self.parser is not None and (in_reasoning or output.startswith(START))
        body_tags = output.removeprefix(START)
        implicit = XML_OPEN.search(body_tags) if self.qwen3 else None
        if self.token_mode and inside and START not in body_tags and body_tags.count(END) <= 1 and (
                implicit is None or END not in body_tags or body_tags.find(END) < implicit.start()):
            for tag in (START, END):  # a well-formed thought: no tag text in either field
                assert tag not in whole["reasoning"] and tag not in whole["content"], (self.where, whole)
        streamed = self.stream(_chat_stream, self.http, self.base + "/v1/chat/completions", body)
        assert streamed == whole, (self.where, streamed, whole)
        return whole

    def check_responses(self, chat: dict | None) -> None:
        body = responses_body(self.case)
        in_reasoning = self.in_reasoning(None)
        r = self.post("/v1/responses", body)
        if self.refused(r, in_reasoning):
            return
        self.check_engine_asked(in_reasoning)
        whole = r.json()
        RESPONSE.validate_python(whole)
        final = self.stream(lambda: check_stream(post_stream(self.http, self.base + "/v1/responses", body),
                                                 self.where))
        assert summary(whole) == summary(final), self.where
        if chat is not None and self.case.enable_thinking is None:  # the same prompt as the chat request
            texts = {kind: "".join(p["text"] for i in whole["output"] if i["type"] == kind for p in i["content"])
                     for kind in ("reasoning", "message")}
            calls = [(i["name"], i["arguments"]) for i in whole["output"] if i["type"] == "function_call"]
            assert (texts["reasoning"], texts["message"], calls) == \
                (chat["reasoning"], chat["content"], chat["calls"]), (self.where, whole["output"], chat)
            assert (whole["status"] == "incomplete") == (chat["finish"] == "length"), self.where


def run_cases(served, seed: int, count: int) -> int:
    urls, engines = served
    checked = 0
    with httpx.Client(timeout=60) as http:
        for name, (reasoning, tool_parser, vocabulary) in SERVERS.items():
            for k, case in enumerate(make_cases(seed, count, xml_ok=tool_parser == "qwen3_coder")):
                c = Case(http, urls[name], engines[name], reasoning, vocabulary != "plain", case,
                         f"{name} seed {seed} case {k}: {case}")
                c.check_responses(c.check_chat())
                checked += 1
    return checked


@pytest.mark.parametrize("seed, count", [(1, 22), (4, 8)])  # through the cases that found the bugs
def test_reasoning_invariants(seed, count, served):
    assert run_cases(served, seed, count) == count * len(SERVERS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5, 40))
def test_reasoning_invariants_many_seeds(seed, served):
    run_cases(served, seed, 25)


def test_cases_exercise_the_features():
    cases = make_cases(1, 25, xml_ok=True) + make_cases(4, 25, xml_ok=True)
    outputs = [c.output for c in cases]
    assert any(o.startswith(START) for o in outputs) and any(not o.startswith(START) for o in outputs)
    assert any(END not in o for o in outputs) and any("<tool_call>\n<function=" in o for o in outputs)
    assert any('"arguments"' in o.split(END)[0] for o in outputs)  # a call inside the thought
    assert {c.finish_reason for c in cases} == {"stop", "length"}
    assert any(c.constrained for c in cases) and any(isinstance(c.tool_choice, dict) for c in cases)
    assert {c.enable_thinking for c in cases} >= {None, False}
    assert any(len(set(c.steps)) > 1 for c in cases)
