"""--tool-call-parser deepseek_v3 and deepseek_v31: whole outputs read as vLLM 0.26's DeepSeekV3ToolParser and
DeepSeekV31ToolParser read them (expected values below checked against vLLM's own patterns), streams in pieces
of every size adding up to the whole response, malformed output never an error, and one end-to-end case per
parser through /v1/chat/completions with a scripted model output."""

from __future__ import annotations

import json

import httpx
import pytest

from meshserve.serve.config import ServeConfig
from meshserve.serve.tool_call_stream import ToolCallStream
from meshserve.serve.tool_calls import ToolPlan
from meshserve.serve.tool_parsers import TOOL_PARSERS, get_tool_parser

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
MARKERS = [CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP]


def v3(name: str, arguments: str, kind: str = "function") -> str:
    return f"{CALL_BEGIN}{kind}{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


def v31(name: str, arguments: str) -> str:
    return f"{CALL_BEGIN}{name}{SEP}{arguments}{CALL_END}"


CALL = {"deepseek_v3": v3, "deepseek_v31": v31}
WEATHER = '{"city": "Paris", "days": [1, {"x": "}"}]}'


def _plan(name: str, parallel: bool = True) -> ToolPlan:
    return ToolPlan("auto", [], parser=get_tool_parser(name), parallel=parallel)


def _whole(plan: ToolPlan, text: str):
    content, calls = plan.extract(text)
    return content, [(c.function.name, c.function.arguments) for c in calls]


def _streamed(plan: ToolPlan, text: str, step: int):
    """(content, [(name, arguments)]) as a client rebuilds them from the text arriving `step` characters at a
    time; each call's first delta names it, later ones carry argument pieces only."""
    stream, content, calls = ToolCallStream(plan), "", {}
    for end in [*range(step, len(text), step), len(text)]:
        piece, deltas = stream.step(text[:end]) if end < len(text) else stream.finish(text)[:2]
        content += piece or ""
        for d in deltas:
            if d.index not in calls:
                assert d.id.startswith("call_") and d.type == "function" and d.function.name is not None
                calls[d.index] = [d.function.name, ""]
            else:
                assert d.id is None and d.function.name is None
            calls[d.index][1] += d.function.arguments or ""
    return content or None, [tuple(calls[i]) for i in sorted(calls)]


def test_registered_under_vllms_names():
    assert {"deepseek_v3", "deepseek_v31"} <= set(TOOL_PARSERS)
    from meshserve.cli import build_parser

    for name in ("deepseek_v3", "deepseek_v31"):
        ns = build_parser(["serve"]).parse_args(["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser", name])
        assert ns.tool_call_parser == name
        assert not get_tool_parser(name).keeps_special_tokens  # ordinary added tokens in DeepSeek's tokenizers


@pytest.mark.parametrize("name", sorted(CALL))
@pytest.mark.parametrize("ncalls", [0, 1, 2])
@pytest.mark.parametrize("before", ["", "Let me check the weather.\n", "\n"])
def test_calls_and_content_before(name, ncalls, before):
    call = CALL[name]
    if ncalls == 0:
        text = before + "It is sunny in Paris."
        expected = (text, [])
    else:
        calls = [call("get_weather", WEATHER), call("get_time", "{}")][:ncalls]
        text = before + CALLS_BEGIN + "\n".join(calls) + CALLS_END
        expected = (before if before.strip() else None,
                    [("get_weather", WEATHER), ("get_time", "{}")][:ncalls])
    plan = _plan(name)
    assert _whole(plan, text) == expected
    for step in range(1, len(text) + 1):
        assert _streamed(plan, text, step) == expected, step


def test_formats_as_vllm_reads_them():
    p3, p31 = _plan("deepseek_v3"), _plan("deepseek_v31")
    # arguments and names are the model's text as written: not checked as JSON, not stripped
    assert _whole(p3, CALLS_BEGIN + v3("f", "not json") + CALLS_END) == (None, [("f", "not json")])
    assert _whole(p31, CALLS_BEGIN + v31(" f ", "{} ") + CALLS_END) == (None, [(" f ", "{} ")])
    # V3: the name is what follows the line's last separator; V3.1: what precedes its first
    assert _whole(p31, CALLS_BEGIN + v31("f", f"{{}}{SEP}x") + CALLS_END) == (None, [("f", f"{{}}{SEP}x")])
    # text after the calls, and between them, is dropped
    text = "Sure. " + CALLS_BEGIN + v3("f", "{}") + " and " + v3("g", "{}") + CALLS_END + " Done."
    assert _whole(p3, text) == ("Sure. ", [("f", "{}"), ("g", "{}")])
    # parallel_tool_calls false keeps the first call
    two = CALLS_BEGIN + v31("f", "{}") + v31("g", "{}") + CALLS_END
    assert _whole(_plan("deepseek_v31", parallel=False), two) == (None, [("f", "{}")])
    assert _streamed(_plan("deepseek_v31", parallel=False), two, 1) == (None, [("f", "{}")])


CUT = "Hi " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + 'f\n```json\n{"a"'  # max_tokens inside the arguments

MALFORMED = [
    # (parser, output, the whole response, whether vLLM 0.26 reads the same: False where it reads fewer calls
    #  than a stream has begun, and the response keeps the calls as streamed, as with every meshserve parser)
    ("deepseek_v3", "Hi " + CALLS_BEGIN + "garbage" + CALLS_END, ("Hi ", []), True),  # vLLM drops the rest
    ("deepseek_v3", CALLS_BEGIN + "garbage", (None, []), True),
    ("deepseek_v3", v3("f", "{}"), (v3("f", "{}"), []), True),  # no calls-begin marker: all content
    ("deepseek_v3", CALLS_BEGIN + v3("f", "{}", kind="tool") + CALLS_END,  # vLLM refuses the type: all content
     (CALLS_BEGIN + v3("f", "{}", kind="tool") + CALLS_END, []), True),
    ("deepseek_v3", CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```python\n{}\n```" + CALL_END + CALLS_END,
     (None, []), True),  # not the format: no call
    ("deepseek_v3", CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f" + CALL_END, (None, []), True),
    ("deepseek_v3", CUT, ("Hi ", [("f", '{"a"')]), False),
    ("deepseek_v3", CALLS_BEGIN + v3("f", '{\n  "a": 1\n}') + CALLS_END, (None, [("f", '{\n  "a": 1\n}')]), False),
    ("deepseek_v3", CALLS_BEGIN + v3("f", "{}") + "\n" + v3("g", "{\n}") + CALLS_END,
     (None, [("f", "{}"), ("g", "{\n}")]), False),
    ("deepseek_v3", CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "f\n```json\n{}\n```" + CALLS_END,
     (None, [("f", "{}")]), False),  # the call's end marker left out
    ("deepseek_v31", CALLS_BEGIN + CALL_BEGIN + "f\n" + SEP + "{}" + CALL_END + CALLS_END, (None, []), True),
    ("deepseek_v31", CALLS_BEGIN + CALL_BEGIN + "f" + SEP + '{"a": 1}' + CALLS_END, (None, [("f", '{"a": 1}')]),
     False),
    ("deepseek_v31", CALLS_BEGIN + v31("f", '{\n"a": 1}') + CALLS_END, (None, [("f", '{\n"a": 1}')]), False),
    ("deepseek_v31", CALLS_BEGIN + v31("f", "{}") + "\n" + CALL_BEGIN + "g" + SEP + '{"b"',
     (None, [("f", "{}"), ("g", '{"b"')]), False),
    ("deepseek_v31", "Hi " + CALLS_BEGIN + CALL_BEGIN + "get_wea", ("Hi ", []), True),  # no name yet: content
]


@pytest.mark.parametrize("name, text, expected, as_vllm", MALFORMED)
def test_malformed_output_is_never_an_error(name, text, expected, as_vllm):
    plan = _plan(name)
    assert _whole(plan, text) == expected
    if as_vllm:  # the parser's own answer is vLLM's
        content, calls = plan.parser.extract(text)
        assert (content, [(c.name, c.arguments) for c in calls]) == expected
    for step in (1, 2, 3, 5, 8, len(text)):
        assert _streamed(plan, text, step) == expected, step


def test_content_streams_until_the_marker_and_nothing_after_it():
    p = get_tool_parser("deepseek_v3")
    assert p.extract_partial("Hello").content_end == 5
    assert p.extract_partial("Hello <｜tool▁ca").content_end == len("Hello ")  # may begin the marker: held
    assert p.extract_partial("a <｜b").content_end == len("a <｜b")
    found = p.extract_partial("Hi " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + "get_weather\n```js")
    assert found.content_end == 3 and found.calls == []  # the head is complete once "```json" follows the name
    found = p.extract_partial("Hi " + CALLS_BEGIN + CALL_BEGIN + "function" + SEP + 'f\n```json\n{"a": 1}\n``')
    assert [(c.name, c.arguments) for c in found.calls] == [("f", '{"a": 1}')]  # what may close it waits
    p31 = get_tool_parser("deepseek_v31")
    found = p31.extract_partial(CALLS_BEGIN + CALL_BEGIN + "get_weather" + SEP)
    assert [(c.name, c.arguments) for c in found.calls] == [("get_weather", "")]


def test_every_piece_size_and_garbage_mixes_add_up():
    """Outputs cut anywhere or with a marker dropped anywhere: the stream always rebuilds the whole response."""
    for name, call in CALL.items():
        plan = _plan(name)
        good = "Ok. " + CALLS_BEGIN + call("get_weather", WEATHER) + "\n" + call("g", "{}") + CALLS_END
        texts = [good[:k] for k in range(len(good) + 1)]
        texts += [good[:k] + m + good[k:] for k in range(0, len(good), 7) for m in MARKERS + ["\n"]]
        for text in texts:
            content, calls = _whole(plan, text)
            whole = (content or None, calls)  # "" whole is no content streamed
            for step in (1, 4):
                assert _streamed(plan, text, step) == whole, (name, text, step)


# -- end to end: /v1/chat/completions with a scripted model output ----------------------------------------------

TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
# V3.1's template: thinking opens <think> in the prompt, otherwise the prompt closes the span
DEEPSEEK_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}"
                     "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% if thinking is defined and thinking %}"
                     "<think>{% else %}</think>{% endif %}{% endif %}")


def deepseek_tokenizer():
    """The tiny BPE tokenizer with DeepSeek's tool markers and the think tags as single, non-special added tokens
    (as in DeepSeek-V3.1's tokenizer)."""
    from tokenizers import AddedToken

    from tests.conftest import VOCAB, _train_tokenizer

    tok = _train_tokenizer(VOCAB - 16)
    tags = ["<think>", "</think>", *MARKERS]
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in tags])
    tok.chat_template = DEEPSEEK_TEMPLATE
    assert max(tok.convert_tokens_to_ids(tags)) < VOCAB
    return tok


@pytest.fixture(scope="module")
def served(tiny_engine):
    from tests.serve.conftest import start_server
    from tests.serve.reasoning.scripted_engine import ScriptedLLM

    servers, engines = {}, {}
    for name in ("deepseek_v3", "deepseek_v31"):
        engines[name] = ScriptedLLM(tiny_engine, deepseek_tokenizer())
        servers[name] = start_server(engines[name], ServeConfig(
            served_model_names=["m"], enable_auto_tool_choice=True, tool_call_parser=name,
            reasoning_parser="deepseek_v3"))
    yield {k: s.base_url for k, s in servers.items()}, engines
    for s in servers.values():
        s.stop()


def _body(**extra):
    return {"model": "m", "messages": [{"role": "user", "content": "Weather in Rome?"}], "tools": [TOOL], **extra}


def _stream(url: str, **extra):
    """(reasoning, content, [(name, arguments)], finish_reason) rebuilt from the stream's chunks."""
    reasoning = content = ""
    calls, finish = {}, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=_body(stream=True, **extra), timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            for ch in json.loads(line[6:])["choices"]:
                delta = ch["delta"]
                reasoning += delta.get("reasoning") or ""
                content += delta.get("content") or ""
                for tc in delta.get("tool_calls") or []:
                    entry = calls.setdefault(tc["index"], ["", ""])
                    entry[0] += tc["function"].get("name") or ""
                    entry[1] += tc["function"].get("arguments") or ""
                finish = ch.get("finish_reason") or finish
    return reasoning or None, content or None, [tuple(calls[i]) for i in sorted(calls)], finish


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v31"])
def test_chat_completions_end_to_end(served, name):
    urls, engines = served
    args = '{"city": "Rome"}'
    output = "Let me look.\n" + CALLS_BEGIN + CALL[name]("get_weather", args) + CALLS_END
    engines[name].say(output)
    choice = httpx.post(urls[name] + "/v1/chat/completions", json=_body(), timeout=60).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me look.\n" and choice["message"].get("reasoning") is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"] == {"name": "get_weather", "arguments": args}
    for per_step in (1, 3):
        engines[name].say(output, per_step)
        assert _stream(urls[name]) == (None, "Let me look.\n", [("get_weather", args)], "tool_calls")

    # V3.1 thinking on: the reasoning up to </think>, then the calls read from the content after it
    engines[name].say("Rome is in Italy.</think>" + CALLS_BEGIN + CALL[name]("get_weather", args) + CALLS_END)
    kwargs = {"chat_template_kwargs": {"thinking": True}}
    message = httpx.post(urls[name] + "/v1/chat/completions", json=_body(**kwargs), timeout=60).json()[
        "choices"][0]["message"]
    assert message["reasoning"] == "Rome is in Italy." and message["content"] is None
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]] == [
        ("get_weather", args)]
    assert _stream(urls[name], **kwargs) == ("Rome is in Italy.", None, [("get_weather", args)], "tool_calls")

    # malformed: never a 500; the text before the marker is the content, as in vLLM
    engines[name].say("Hmm " + CALLS_BEGIN + "oops" + CALLS_END)
    r = httpx.post(urls[name] + "/v1/chat/completions", json=_body(), timeout=60)
    assert r.status_code == 200
    choice = r.json()["choices"][0]
    assert (choice["message"]["content"], choice["message"].get("tool_calls"), choice["finish_reason"]) == (
        "Hmm ", None, "stop")
    assert _stream(urls[name]) == (None, "Hmm ", [], "stop")
