"""vLLM's return_token_ids on /v1/completions: each choice (each streamed chunk) carries its generated ids, the
streamed ids add up to the whole answer's, each choice carries its prompt's ids (streamed: in its first chunk only,
vllm/entrypoints/openai/completion/serving.py), and without the flag the shape stays OpenAI's. Then on
/v1/chat/completions, with n > 1 and with a reasoning parser and tool calls."""

from __future__ import annotations

import json

import pytest

from tests.serve.conftest import MODEL


def _stream(http, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                       "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def test_streamed_ids_add_up_to_the_whole_answers(http):
    body = {"model": MODEL, "prompt": [5, 17, 40, 99, 123], "max_tokens": 12, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}
    whole = http.post("/v1/completions", json=body).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 12
    chunks = _stream(http, body)
    streamed = [i for c in chunks for ch in c["choices"] for i in ch["token_ids"]]
    assert streamed == ids
    assert chunks[-1]["usage"]["completion_tokens"] == 12
    # greedy: the ids are the model's own continuation, so re-sending them extends the same sequence
    longer = http.post("/v1/completions", json={**body, "max_tokens": 4, "prompt": body["prompt"] + ids[:6]}).json()
    assert longer["choices"][0]["token_ids"] == ids[6:10]


def test_without_the_flag_no_ids_are_sent(http):
    body = {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    # vLLM's shape: the keys are there, null (test_response_shape_parity.py)
    assert choice["token_ids"] is None and choice["prompt_token_ids"] is None
    assert all(ch["token_ids"] is None and ch["prompt_token_ids"] is None for c in _stream(http, body)
               for ch in c["choices"])


def test_each_choice_carries_its_prompt_s_ids(http):
    prompts = [[5, 17, 40], [7, 8, 9, 10]]
    body = {"model": MODEL, "prompt": prompts, "n": 2, "max_tokens": 3, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}
    whole = http.post("/v1/completions", json=body).json()
    assert [c["prompt_token_ids"] for c in whole["choices"]] == [prompts[0]] * 2 + [prompts[1]] * 2
    text = http.post("/v1/completions", json={**body, "prompt": "hello world", "n": 1}).json()["choices"][0]
    assert text["prompt_token_ids"] == http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"}
                                                 ).json()["tokens"]
    # streamed: in each choice's first chunk, and in no later one
    seen: dict[int, list] = {}
    for chunk in _stream(http, body):
        for ch in chunk["choices"]:
            assert (ch["prompt_token_ids"] is not None) == (ch["index"] not in seen)
            seen.setdefault(ch["index"], []).append(ch.get("prompt_token_ids"))
    assert {i: ids[0] for i, ids in seen.items()} == {0: prompts[0], 1: prompts[0], 2: prompts[1], 3: prompts[1]}


def test_with_echo_the_prompt_s_ids_stand_for_its_text(http):
    # vLLM: echo with return_token_ids leaves the prompt's text out (prompt_text = ""); its logprobs stay
    body = {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "echo": True, "return_token_ids": True, "logprobs": 1}
    plain = http.post("/v1/completions", json={**body, "echo": False, "logprobs": None}).json()["choices"][0]
    echoed = http.post("/v1/completions", json=body).json()["choices"][0]
    assert echoed["text"] == plain["text"] and echoed["token_ids"] == plain["token_ids"]
    assert echoed["prompt_token_ids"] == [5, 17, 40] and len(echoed["logprobs"]["tokens"]) == 5
    streamed = [ch for c in _stream(http, body) for ch in c["choices"]]
    assert "".join(ch["text"] for ch in streamed) == plain["text"]
    assert streamed[0]["prompt_token_ids"] == [5, 17, 40]
    only = http.post("/v1/completions", json={**body, "max_tokens": 0}).json()["choices"][0]
    assert only["text"] == "" and only["prompt_token_ids"] == [5, 17, 40] and len(only["token_ids"]) == 1


# -- chat completions (vllm/entrypoints/openai/chat_completion/serving.py): each choice's token_ids, the response's
# prompt_token_ids; streamed, the role chunks (each choice's first) carry prompt_token_ids and every later chunk
# its delta's ids, the raw generated ids whatever the reasoning and tool parsers make of the text
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Tell me a story"}]


def _chat_stream(base, body: dict, path: str = CHAT) -> list[dict]:
    import httpx

    chunks = []
    with httpx.stream("POST", f"{base}{path}", timeout=60,
                      json={**body, "stream": True, "stream_options": {"include_usage": True}}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def _per_choice(chunks: list[dict]) -> dict[int, tuple[list[int], str]]:
    """Each choice's streamed ids and content (the role chunks left out)."""
    out: dict[int, tuple[list[int], str]] = {}
    for chunk in chunks:
        for ch in chunk["choices"]:
            if ch["delta"].get("role") is not None:
                assert "token_ids" not in ch
                continue
            ids, text = out.setdefault(ch["index"], ([], ""))
            assert "token_ids" in ch, ch  # every generated chunk carries its ids (maybe none)
            out[ch["index"]] = (ids + ch["token_ids"], text + (ch["delta"].get("content") or ""))
    return out


@pytest.mark.parametrize("extra", [{}, {"logprobs": True}], ids=["fast", "logprobs"])
def test_chat_streamed_ids_add_up_to_the_whole_answers(http, extra):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    whole = http.post(CHAT, json=body).json()
    choice = whole["choices"][0]
    ids, content = choice["token_ids"], choice["message"]["content"]
    assert len(ids) == whole["usage"]["completion_tokens"] == 12
    prompt_ids = http.post("/tokenize", json={"model": MODEL, "messages": MESSAGES}).json()["tokens"]
    assert whole["prompt_token_ids"] == prompt_ids and whole["usage"]["prompt_tokens"] == len(prompt_ids)
    # the ids are the text's: decoded, they give the answer
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json()["prompt"] == content
    chunks = _chat_stream(http.base_url, body)
    assert _per_choice(chunks) == {0: (ids, content)}
    # the prompt's ids in the role chunk only, beside the choices (as vLLM's ChatCompletionStreamResponse)
    assert [c.get("prompt_token_ids") for c in chunks] == [prompt_ids] + [None] * (len(chunks) - 1)
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_chat_n_2_each_choice_its_ids(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "n": 2}
    whole = http.post(CHAT, json=body).json()
    by_index = {c["index"]: (c["token_ids"], c["message"]["content"]) for c in whole["choices"]}
    assert sorted(by_index) == [0, 1] and all(len(ids) == 6 for ids, _ in by_index.values())
    chunks = _chat_stream(http.base_url, body)
    assert _per_choice(chunks) == by_index
    roles = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("role")]
    assert [c["choices"][0]["index"] for c in roles] == [0, 1]
    assert all(c["prompt_token_ids"] == whole["prompt_token_ids"] for c in roles)
    assert sum("prompt_token_ids" in c for c in chunks) == 2


def test_chat_without_the_flag_no_ids_are_sent(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    whole = http.post(CHAT, json=body).json()
    assert whole["prompt_token_ids"] is None and whole["choices"][0]["token_ids"] is None
    for chunk in _chat_stream(http.base_url, body):
        assert chunk.get("prompt_token_ids") is None and all(ch.get("token_ids") is None for ch in chunk["choices"])
    null = http.post(CHAT, json={**body, "return_token_ids": None}).json()  # vLLM's null: the default
    assert null["prompt_token_ids"] is None


@pytest.fixture(scope="module")
def reasoning_server(tiny_engine):
    """qwen3's reasoning parser and Hermes tool calls over a scripted output (tests/serve/reasoning)."""
    from meshserve.serve.config import ServeConfig
    from tests.reasoning_model import reasoning_tokenizer
    from tests.serve.reasoning.scripted_engine import scripted_server

    with scripted_server(tiny_engine, reasoning_tokenizer(), ServeConfig(
            served_model_names=["m"], reasoning_parser="qwen3", enable_auto_tool_choice=True,
            tool_call_parser="hermes")) as served:
        yield served


TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.mark.parametrize("output,tools", [
    ("<think>The user asks about Rome.</think>\n\nIt is sunny.", None),
    ('<think>Rome.</think><tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>', [TOOL]),
], ids=["reasoning", "tool-call"])
def test_chat_ids_are_the_raw_output_whatever_the_parsers_make_of_it(reasoning_server, output, tools):
    import httpx

    base, engine = reasoning_server
    body = {"model": "m", "messages": MESSAGES, "return_token_ids": True, **({"tools": tools} if tools else {})}
    script = engine.say(output)
    whole = httpx.post(base + CHAT, json=body, timeout=60).json()
    choice = whole["choices"][0]
    assert choice["token_ids"] == script  # the tags and the call's markup included
    assert choice["message"]["reasoning"] and (choice["message"]["content"] or choice["message"].get("tool_calls"))
    assert (choice["finish_reason"] == "tool_calls") == bool(tools)
    for per_step in (1, 3):
        engine.say(output, per_step)
        chunks = _chat_stream(base, body)
        streamed = [i for c in chunks for ch in c["choices"] for i in ch.get("token_ids") or []]
        assert streamed == script  # a chunk for the tokens whose text the parsers held back too
    # include_reasoning false: the ids would give the reasoning away, so vLLM leaves them out (the prompt's stay)
    engine.say(output)
    hidden = httpx.post(base + CHAT, json={**body, "include_reasoning": False}, timeout=60).json()
    assert hidden["choices"][0]["token_ids"] is None and hidden["prompt_token_ids"]
    engine.say(output)
    chunks = _chat_stream(base, {**body, "include_reasoning": False})
    assert not any(ch.get("token_ids") is not None for c in chunks for ch in c["choices"])
    assert chunks[0]["prompt_token_ids"] == hidden["prompt_token_ids"]
