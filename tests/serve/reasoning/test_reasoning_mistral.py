"""mistral (Magistral): `[THINK] ... [/THINK]` as special tokens, split as vLLM 0.26's mistral parser splits
them (its extract_reasoning, read plainly in `vllm_split` below): no `[THINK]` in the output means all content;
text before `[THINK]` is content; a `[THINK]` never closed leaves the rest reasoning; a stray `[/THINK]` is
dropped. Streamed in every cut, the deltas add up to the whole split; end to end over /v1/chat/completions
with a scripted output, tool calls (--tool-call-parser mistral) read from the content after the thought."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from types import SimpleNamespace

import httpx
import pytest

from meshserve.engine.chat_template import render_chat
from meshserve.serve.config import ServeConfig
from meshserve.serve.reasoning import REASONING_PARSERS, get_reasoning_parser
from meshserve.serve.reasoning.chat import plan_reasoning
from meshserve.structured.params import StructuredOutputsParams
from tests.serve.reasoning.chat_stream import joined, stream_choices
from tests.serve.reasoning.split_check import check_every_split, stream_split

START, END, CALLS = "[THINK]", "[/THINK]", "[TOOL_CALLS]"
# Magistral's template: a system prompt whose example closes its [THINK] ... [/THINK], then [INST] ... [/INST]
MAGISTRAL_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}[SYSTEM_PROMPT]{{ m['content'] }}[/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST]{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}<|im_end|>"
    "{% endif %}{% endfor %}")
SYSTEM = "Think first, like this: " + START + "your thoughts" + END + " then answer."


def mistral_tokenizer():
    """The tiny BPE tokenizer with tekken's [THINK], [/THINK] and [TOOL_CALLS] as special added tokens."""
    from tokenizers import AddedToken

    from tests.conftest import VOCAB, _train_tokenizer

    tok = _train_tokenizer(VOCAB - 8)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in (START, END, CALLS)],
                   special_tokens=True)
    tok.chat_template = MAGISTRAL_TEMPLATE
    assert max(tok.convert_tokens_to_ids([START, END, CALLS])) < VOCAB
    return tok


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def vllm_split(output: str) -> tuple[str | None, str | None]:
    """vLLM 0.26's MistralReasoningParser.extract_reasoning read plainly, "" as None (meshserve's fields)."""
    before, bot, after = output.partition(START)
    if bot and END in after:  # a span opened and closed
        reasoning, _, rest = after.partition(END)
        return reasoning or None, (before + rest) or None
    if bot:  # opened, never closed
        return after or None, before or None
    if END in before:  # a stray end tag: dropped (the first one)
        head, _, tail = before.partition(END)
        return None, (head + tail) or None
    return None, before or None


CASES = [
    (START + "The user asks about Rome." + END + "It is sunny.", ("The user asks about Rome.", "It is sunny.")),
    ("It is sunny.", (None, "It is sunny.")),  # no [THINK]: all content, not a cut-short thought
    (START + "Still thinking about the weat", ("Still thinking about the weat", None)),  # cut by max_tokens
    (START + "Hmm." + END, ("Hmm.", None)),
    (START + END + "Sunny.", (None, "Sunny.")),
    ("Well, " + START + "hmm" + END + " sunny.", ("hmm", "Well,  sunny.")),  # text before [THINK] is content
    ("Well, " + START + "hmm", ("hmm", "Well, ")),
    ("Hmm." + END + "Sunny.", (None, "Hmm.Sunny.")),  # a stray [/THINK]: dropped, all content
    ("a" + END + "b" + END + "c", (None, "ab" + END + "c")),  # ...the first one only
    (START + "a " + START + "b" + END + "c " + START + "d" + END, ("a " + START + "b", "c " + START + "d" + END)),
    ("Use [THI and /THINK] freely, [x]", (None, "Use [THI and /THINK] freely, [x]")),  # near-tags are text
    (START + "[/THIN" + END + "[THIN", ("[/THIN", "[THIN")),
    ("[/THIN", (None, "[/THIN")),  # the start of a tag at the very end is text after all
    (START + "I will check." + END + CALLS + 'get_weather{"city": "Rome"}',
     ("I will check.", CALLS + 'get_weather{"city": "Rome"}')),
    ("", (None, None)),
]


def test_registered_with_the_tags_as_special_tokens(tokenizer):
    assert "mistral" in REASONING_PARSERS
    parser = get_reasoning_parser("mistral", tokenizer)
    assert parser.token_mode and parser.keeps_special_tokens  # the text must keep them to show them
    assert (parser.start_id, parser.end_id) == tuple(tokenizer.convert_tokens_to_ids([START, END]))
    text_mode = get_reasoning_parser("mistral")
    assert not text_mode.token_mode and not text_mode.keeps_special_tokens


@pytest.mark.parametrize("text,expected", CASES)
def test_outputs_as_vllm_splits_them_whole_and_streamed(tokenizer, text, expected):
    assert vllm_split(text) == expected
    parser = get_reasoning_parser("mistral", tokenizer)
    parser._test_tokenizer = tokenizer
    ids = tokenizer(text).input_ids
    assert text == tokenizer.decode(ids) and ids.count(parser.start_id) == text.count(START)
    check_every_split(parser, text, ids, False, expected)  # token mode: every cut in two, one token per delta
    check_every_split(get_reasoning_parser("mistral"), text, None, False, expected)  # text mode: every 2 cuts


def deltas_of(tokenizer, ids: list[int], bounds) -> list[tuple[str, list[int]]]:
    """The deltas of ids cut at bounds, each one's text what decoding the ids so far adds (a character cut
    between tokens withheld until complete, as the engine's detokenizer does)."""
    out, prev = [], ""
    for a, b in itertools.pairwise(bounds):
        now = tokenizer.decode(ids[:b])
        now = now if b == len(ids) else now.rstrip("\ufffd")
        out.append((now[len(prev):], ids[a:b]))
        prev = now
    return out


def every_stream(tokenizer, ids: list[int]):
    """Pieces of 1..N tokens, and every cut in two."""
    for size in range(1, len(ids) + 1):
        yield deltas_of(tokenizer, ids, [*range(0, len(ids), size), len(ids)])
    for cut in range(1, len(ids)):
        yield deltas_of(tokenizer, ids, (0, cut, len(ids)))


def test_streamed_in_pieces_of_every_size(tokenizer):
    parser = get_reasoning_parser("mistral", tokenizer)
    for text, expected in CASES:
        for deltas in every_stream(tokenizer, tokenizer(text).input_ids):
            assert stream_split(parser, deltas, False) == expected, (text, deltas)


PIECES = ["The user asks", " about Rome", ".", " Hmm,", " 東京", " 🙂", " café", "\n", "\n\n", " ", "{", "}",
          '"', "[", "]", "/", "THINK", "[THI", "[/TH", "INK]", START, START, END, END, CALLS,
          'get_weather{"city": "Rome"}']


def test_random_outputs_match_vllm(tokenizer):
    """Seeded mixtures of tags, near-tags and text, cut anywhere: the split equals vLLM's, whole and streamed.
    Left out: a stray [/THINK] followed later by a [THINK] (vLLM keeps that stray tag as content, which no
    stream can know when it passes; here it is dropped)."""
    rng = random.Random(7)
    parser = get_reasoning_parser("mistral", tokenizer)
    parser._test_tokenizer = tokenizer
    checked = 0
    while checked < 300:
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 10)))
        first_end, first_start = text.find(END), text.find(START)
        if 0 <= first_end < first_start:
            continue
        expected = vllm_split(text)
        ids = tokenizer(text).input_ids
        assert parser.extract(text, ids, False) == expected, text
        assert get_reasoning_parser("mistral").extract(text, None, False) == expected, text
        for deltas in every_stream(tokenizer, ids):
            assert stream_split(parser, deltas, False) == expected, deltas
        for _ in range(3):  # text mode, cut at random characters (a tag anywhere)
            cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if text else []
            bounds = [0, *cuts, len(text)]
            deltas = [(text[a:b], []) for a, b in itertools.pairwise(bounds)]
            assert stream_split(get_reasoning_parser("mistral"), deltas, False) == expected, deltas
        checked += 1


def test_token_mode_counts_a_tag_only_where_its_token_is(tokenizer):
    """"[THINK]" spelled with ordinary tokens (a model writing about tags) opens no span in token mode."""
    spelled = tokenizer.convert_tokens_to_ids(list(START))
    ids = tokenizer("x ").input_ids + spelled + tokenizer("y").input_ids
    text = tokenizer.decode(ids)
    assert START in text and tokenizer.convert_tokens_to_ids(START) not in ids
    assert get_reasoning_parser("mistral", tokenizer).extract(text, ids, False) == (None, text)
    assert get_reasoning_parser("mistral").extract(text, None, False) == ("y", "x ")  # text mode: it counts


def test_where_the_output_starts(tokenizer):
    """Outside the span unless the prompt's last tag opened it: Magistral's system prompt closes its example."""
    parser = get_reasoning_parser("mistral", tokenizer)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather?"}]
    prompt = render_chat(tokenizer, chat, add_generation_prompt=True)  # as the server renders it
    assert parser.end_id in prompt and parser.starts_in_reasoning(None, prompt) is False
    assert parser.starts_in_reasoning(None, tokenizer("[INST]hi[/INST]").input_ids) is False  # no tag: outside
    assert parser.starts_in_reasoning({"enable_thinking": True}, []) is False
    opened = tokenizer("[INST]hi[/INST]" + START).input_ids  # an assistant turn prefilled with [THINK]
    assert parser.starts_in_reasoning(None, opened) is True
    parser._test_tokenizer = tokenizer
    for text, expected in (("Hmm." + END + "Sunny.", ("Hmm.", "Sunny.")), ("Hmm.", ("Hmm.", None)),
                           (START + "Hmm." + END + "Sunny.", ("Hmm.", "Sunny.")), (END + "Sunny.", (None, "Sunny."))):
        check_every_split(parser, text, tokenizer(text).input_ids, True, expected)


def _plan(parser, prompt_ids, prompt_text: str = ""):
    req = SimpleNamespace(chat_template_kwargs=None, include_reasoning=True, response_format=None)
    params = SimpleNamespace(skip_special_tokens=True, structured_outputs=StructuredOutputsParams(json={}))

    async def decode(ids):  # text mode reads the prompt's text
        return prompt_text

    plan = asyncio.run(plan_reasoning(parser, req, prompt_ids, params, client=SimpleNamespace(decode=decode)))
    return plan, params


def test_structured_outputs_and_special_tokens(tokenizer):
    """The tags are special: the request keeps special tokens. Outside a span (every Magistral prompt) the
    grammar holds from the first token, as vLLM's does when the prompt closed a span; in a span the prompt
    opened, after [/THINK]."""
    parser = get_reasoning_parser("mistral", tokenizer)
    plan, params = _plan(parser, tokenizer("[INST]hi[/INST]").input_ids)
    assert params.skip_special_tokens is False and params.structured_outputs.reasoning_end_token_id is None
    assert plan.split('{"a": 1}', tokenizer('{"a": 1}').input_ids) == (None, '{"a": 1}')
    plan, params = _plan(parser, tokenizer("[INST]hi[/INST]" + START).input_ids)
    assert params.structured_outputs.reasoning_end_token_id == parser.end_id
    plan, params = _plan(get_reasoning_parser("mistral"), [1, 2], SYSTEM)  # text mode, outside: no end token needed
    assert params.skip_special_tokens is True and params.structured_outputs.reasoning_end_token_id is None


# -- end to end ---------------------------------------------------------------------------------------------------
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Weather in Rome?"}]


@pytest.fixture(scope="module")
def served(tiny_engine):
    from tests.serve.reasoning.scripted_engine import scripted_server

    with scripted_server(tiny_engine, mistral_tokenizer(), ServeConfig(
            served_model_names=["m"], reasoning_parser="mistral", enable_auto_tool_choice=True,
            tool_call_parser="mistral")) as served:
        yield served


def _chat(url: str, **body) -> dict:
    r = httpx.post(url + "/v1/chat/completions", json={"model": "m", "messages": MESSAGES, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("output,finish", [
    (START + "The user asks about Rome." + END + "\n\nIt is sunny.", "stop"),
    ("It is sunny.", "stop"),
    (START + "Still thinking about the weat", "length"),
])
def test_served_whole_and_streamed(served, output, finish):
    url, engine = served
    expected = vllm_split(output)
    engine.say(output, finish_reason=finish)
    message = _chat(url)["message"]
    assert (message.get("reasoning"), message["content"]) == expected
    assert engine.params[-1].skip_special_tokens is False
    for per_step in (1, 3):
        engine.say(output, per_step, finish_reason=finish)
        choices = stream_choices(url, messages=MESSAGES)
        assert (joined(choices, "reasoning"), joined(choices, "content")) == expected
        assert not any("THINK]" in (c["delta"].get("reasoning") or "") + (c["delta"].get("content") or "")
                       for c in choices)
        assert choices[-1]["finish_reason"] == finish


def test_served_tool_call_after_the_thought(served):
    url, engine = served
    thought = "I could call " + CALLS + 'get_weather{"city": "Paris"} but Rome it is.'
    output = START + thought + END + CALLS + 'get_weather{"city": "Rome"}'
    engine.say(output)
    choice = _chat(url, tools=[TOOL])
    assert choice["message"]["reasoning"] == thought and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Rome"}'}]
    engine.say(output, 2)
    choices = stream_choices(url, messages=MESSAGES, tools=[TOOL])
    assert joined(choices, "reasoning") == thought and not (joined(choices, "content") or "").strip()
    calls = [tc for c in choices for tc in c["delta"].get("tool_calls") or []]
    assert [tc["function"]["name"] for tc in calls if tc["function"].get("name")] == ["get_weather"]
    assert json.loads("".join(tc["function"].get("arguments") or "" for tc in calls)) == {"city": "Rome"}
    assert choices[-1]["finish_reason"] == "tool_calls"

    engine.say(START + thought + END + "No call after all.")  # a call in the thought only
    choice = _chat(url, tools=[TOOL])
    assert choice["message"].get("tool_calls") is None and choice["message"]["content"] == "No call after all."


def test_served_include_reasoning_false_and_structured(served):
    url, engine = served
    engine.say(START + "Hmm." + END + "Sunny.")
    message = _chat(url, include_reasoning=False)["message"]
    assert message["reasoning"] is None and message["content"] == "Sunny."
    engine.say('{"city": "Rome"}')
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    message = _chat(url, response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})[
        "message"]
    assert message["content"] == '{"city": "Rome"}' and message.get("reasoning") is None
    assert engine.params[-1].structured_outputs.reasoning_end_token_id is None  # the system prompt closed a span
