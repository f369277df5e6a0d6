"""Seeded random outputs of a reasoning model and requests to answer with them, for the reasoning differential
fuzz (test_reasoning_differential.py): mixtures of `<think>`, `</think>`, partial tags, Hermes and XML tool
calls inside and after the thought, whitespace and unicode, each with random per-step chunking and finish
reason; and the split a plain reading of vLLM's rules gives (the oracle the served answers must equal)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

START, END = "<think>", "</think>"
HERMES_CALL = '<tool_call>{"name": "get_weather", "arguments": {"city": "%s"}}</tool_call>'
XML_CALL = "<tool_call>\n<function=get_weather>\n<parameter=city>\n%s\n</parameter>\n</function>\n</tool_call>"
WORDS = ["The user asks", " about Rome", ".", " Hmm,", " 東京", " 🙂", " café", " naïve", "\n", "\n\n", " ", "  ",
         "\t", "It is sunny", " 21°C", "{", "}", '"', "0123", "<", ">", "/", "think", "<thi", "</th", "ink>",
         "</", "<tool_call", "<tool_call>", "tool_call>", "<function", "</tool_call>"]
TOOL = {"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SCHEMA_FORMAT = {"type": "json_schema", "name": "a", "schema": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
XML_OPEN = re.compile(r"<tool_call>\s*<function[\s=]")


def _words(rng: random.Random, most: int) -> str:
    return "".join(rng.choice(WORDS) for _ in range(rng.randint(0, most)))


def _call(rng: random.Random, xml_ok: bool) -> str:
    city = rng.choice(["Rome", "Paris", "東京"])
    return (XML_CALL if xml_ok and rng.random() < 0.5 else HERMES_CALL) % city


def make_output(rng: random.Random, xml_ok: bool) -> str:
    """A thought (maybe opened by <think>, maybe closed, maybe holding a call or stray tags) and an answer
    (text, calls, whitespace), or an output cut anywhere."""
    parts = []
    if rng.random() < 0.5:
        parts.append(START)
    parts.append(_words(rng, 6))
    if rng.random() < 0.2:
        parts.append(_call(rng, xml_ok))  # a call inside the thought
    if rng.random() < 0.1:
        parts.append(rng.choice([START, END, "<think", "</think"]))  # a stray tag
    if rng.random() < 0.75:
        parts.append(END)
    parts.append(rng.choice(["", "\n\n", " ", "\n"]))
    parts.append(_words(rng, 5))
    for _ in range(rng.choice([0, 0, 1, 2])):
        parts.append(_call(rng, xml_ok) + rng.choice(["", "\n"]))
    if rng.random() < 0.1:
        parts.append(_words(rng, 3))
    return "".join(parts)


@dataclass
class ReasoningCase:
    """One scripted output and the request it answers."""

    output: str
    steps: list[int]  # tokens per engine step, repeated to the end
    finish_reason: str
    input: str | list[dict]
    tools: bool
    tool_choice: Any = None  # None, "none", "auto", "required", or {"type": "function", "name": ...}
    text_format: dict | None = None
    enable_thinking: bool | None = None  # chat only (chat_template_kwargs)
    extra: dict = field(default_factory=dict)

    @property
    def constrained(self) -> bool:
        return self.text_format is not None or self.tool_choice == "required" or isinstance(self.tool_choice, dict)


def make_cases(seed: int, count: int, xml_ok: bool) -> list[ReasoningCase]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        user = rng.choice(["Weather in Rome?", "What is " + START + "?", "Say " + END + " once.", "東京 🙂"])
        inp: str | list[dict] = user
        if rng.random() < 0.4:  # a history; an assistant turn may leave a tag in the prompt
            inp = [{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": rng.choice(["Hello", START + "hm", "hm" + END + "Hello"])},
                   {"role": "user", "content": [{"type": "input_text", "text": user}]}]
        tools = rng.random() < 0.5
        choice = rng.choice([None, "none", "auto", "required", {"type": "function", "name": "get_weather"}]) \
            if tools else None
        text_format = SCHEMA_FORMAT if not tools and rng.random() < 0.2 else \
            {"type": "json_object"} if not tools and rng.random() < 0.1 else None
        cases.append(ReasoningCase(
            output=make_output(rng, xml_ok), steps=[rng.randint(1, 4) for _ in range(rng.randint(1, 4))],
            finish_reason=rng.choice(["stop", "stop", "length"]), input=inp, tools=tools, tool_choice=choice,
            text_format=text_format, enable_thinking=rng.choice([None, None, True, False])))
    cut = random.Random(seed + 1_000_003)  # its own draws: the cases above stay as they were
    for case in cases:
        if case.finish_reason == "length" and cut.random() < 0.5:  # max_tokens cut it anywhere, a call too
            case.output = case.output[:cut.randint(0, len(case.output))]
    return cases


# -- the two requests of a case ---------------------------------------------------------------------------------
def chat_messages(case: ReasoningCase) -> list[dict]:
    if isinstance(case.input, str):
        return [{"role": "user", "content": case.input}]
    return [{"role": m["role"], "content": m["content"] if isinstance(m["content"], str)
             else "\n".join(p["text"] for p in m["content"])} for m in case.input]


def chat_body(case: ReasoningCase) -> dict:
    body: dict[str, Any] = {"model": "m", "messages": chat_messages(case)}
    if case.tools:
        body["tools"] = [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}]
    if isinstance(case.tool_choice, dict):
        body["tool_choice"] = {"type": "function", "function": {"name": case.tool_choice["name"]}}
    elif case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    if case.text_format is not None:
        fmt = case.text_format
        body["response_format"] = fmt if fmt["type"] == "json_object" else {
            "type": "json_schema", "json_schema": {"name": fmt["name"], "schema": fmt["schema"]}}
    if case.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": case.enable_thinking}
    return body


def responses_body(case: ReasoningCase) -> dict:
    body: dict[str, Any] = {"model": "m", "input": case.input}
    if case.tools:
        body["tools"] = [TOOL]
    if case.tool_choice is not None:
        body["tool_choice"] = case.tool_choice
    if case.text_format is not None:
        body["text"] = {"format": case.text_format}
    return body


# -- the oracle -----------------------------------------------------------------------------------------------
def expected_split(output: str, in_reasoning: bool, token_mode: bool, xml_end: bool) -> tuple[str, str]:
    """(reasoning, content) by the rules of reasoning/base.py read plainly: an output opening with <think> is
    reasoning after it; else it starts where the prompt left it; inside, text up to the first </think>
    (dropped) or an XML tool call (kept, qwen3) is reasoning, the rest content; never closed: all reasoning.
    In token mode the scripted text's tags are their tokens, so the text alone tells here too."""
    if output.startswith(START):
        output, in_reasoning = output[len(START):], True
    if not in_reasoning:
        return "", output
    end = output.find(END)
    m = XML_OPEN.search(output) if xml_end else None
    implicit = m.start() if m else -1
    if end >= 0 and (implicit < 0 or end < implicit):
        return output[:end], output[end + len(END):]
    if implicit >= 0:
        return output[:implicit], output[implicit:]
    return output, ""


def prompt_in_reasoning(prompt: list[int] | str, start: int | str, end: int | str, enable_thinking) -> bool:
    """Whether the rendered prompt leaves the output inside the thought: its last tag decides; with no tag,
    inside unless thinking is disabled (qwen3's rule; deepseek_r1 ignores the flag)."""
    seq = prompt if isinstance(prompt, list) else None
    if seq is not None:
        for token in reversed(seq):
            if token in (start, end):
                return token == start
    else:
        s, e = prompt.rfind(start), prompt.rfind(end)  # type: ignore[arg-type]
        if s >= 0 or e >= 0:
            return s > e
    return enable_thinking is not False


def joined_calls(tool_calls: list[dict] | None) -> list[tuple[str, str]]:
    return [(c["function"]["name"], c["function"]["arguments"]) for c in tool_calls or []]


def json_safe(value) -> str:
    return json.dumps(value, ensure_ascii=False)
