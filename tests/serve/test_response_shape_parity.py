"""Response shapes key by key against vLLM 0.26's (read from its source: CI has no vLLM).

vLLM sends a whole response as `model_dump()`: every field of its model, null when unused (ChatMessage drops an
empty tool_calls). It sends a stream chunk as `model_dump_json(exclude_unset=True)`: the fields its handlers set,
nulls included where they set them (the final usage chunk adds exclude_none). The tables below are those key sets:
NULL marks a key whose value is null here, VALUE one that is not, ANY either. Deliberate differences, kept:
system_fingerprint is null (vLLM's --fingerprint-mode none), usage.prompt_tokens_details is always reported
(vLLM's --enable-prompt-tokens-details), owned_by is "meshserve", error type/code follow OpenAI's names.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.serve.conftest import MODEL

NULL, VALUE, ANY = "null", "value", "any"

# vllm/entrypoints/openai/chat_completion/protocol.py: ChatCompletionResponse, ChatCompletionResponseChoice,
# ChatMessage; openai/engine/protocol.py: UsageInfo
CHAT_RESPONSE = {"id": VALUE, "object": VALUE, "created": VALUE, "model": VALUE, "choices": VALUE,
                 "service_tier": NULL, "system_fingerprint": NULL, "usage": VALUE, "prompt_logprobs": NULL,
                 "prompt_token_ids": NULL, "prompt_text": NULL, "kv_transfer_params": NULL,
                 "ec_transfer_params": NULL, "metrics": NULL}
CHAT_CHOICE = {"index": VALUE, "message": VALUE, "logprobs": NULL, "finish_reason": VALUE, "stop_reason": ANY,
               "token_ids": NULL, "routed_experts": NULL}
CHAT_MESSAGE = {"role": VALUE, "content": VALUE, "refusal": NULL, "annotations": NULL, "audio": NULL,
                "function_call": NULL, "reasoning": NULL}  # tool_calls: absent when empty
USAGE = {"prompt_tokens": VALUE, "total_tokens": VALUE, "completion_tokens": VALUE,
         "prompt_tokens_details": VALUE}  # vLLM: null without --enable-prompt-tokens-details (deliberate)

# chat_completion/serving.py chat_completion_stream_generator: the fields each chunk sets
CHUNK_HEAD = {"id": VALUE, "object": VALUE, "created": VALUE, "model": VALUE, "choices": VALUE}
CHAT_ROLE_CHUNK = {**CHUNK_HEAD, "prompt_token_ids": NULL, "prompt_text": NULL}
CHAT_ROLE_CHOICE = {"index": VALUE, "delta": VALUE, "logprobs": NULL, "finish_reason": NULL}
CHAT_CHOICE_CHUNK = {"index": VALUE, "delta": VALUE, "logprobs": ANY, "finish_reason": NULL, "token_ids": NULL}
CHAT_FINAL_CHOICE = {**CHAT_CHOICE_CHUNK, "finish_reason": VALUE, "stop_reason": ANY}
# the usage chunk: exclude_none, choices []
USAGE_CHUNK = {**CHUNK_HEAD, "usage": VALUE}

# completion/protocol.py: CompletionResponse, CompletionResponseChoice, CompletionResponseStreamChoice
COMPLETION_RESPONSE = {"id": VALUE, "object": VALUE, "created": VALUE, "model": VALUE, "choices": VALUE,
                       "service_tier": NULL, "system_fingerprint": NULL, "usage": VALUE,
                       "kv_transfer_params": NULL, "ec_transfer_params": NULL, "metrics": NULL}
COMPLETION_CHOICE = {"index": VALUE, "text": VALUE, "logprobs": NULL, "finish_reason": VALUE, "stop_reason": ANY,
                     "token_ids": NULL, "prompt_logprobs": NULL, "prompt_token_ids": NULL, "routed_experts": NULL}
COMPLETION_CHUNK_CHOICE = {"index": VALUE, "text": VALUE, "logprobs": ANY, "finish_reason": ANY,
                           "stop_reason": ANY, "prompt_token_ids": NULL, "token_ids": NULL}

# openai/engine/protocol.py: ModelList, ModelCard, ModelPermission, ErrorResponse, ErrorInfo;
# serve/tokenize/protocol.py: TokenizeResponse, DetokenizeResponse
MODEL_LIST = {"object": VALUE, "data": VALUE}
MODEL_CARD = {"id": VALUE, "object": VALUE, "created": VALUE, "owned_by": VALUE, "root": VALUE, "parent": NULL,
              "max_model_len": VALUE, "permission": VALUE}
MODEL_PERMISSION = {"id": VALUE, "object": VALUE, "created": VALUE, "allow_create_engine": VALUE,
                    "allow_sampling": VALUE, "allow_logprobs": VALUE, "allow_search_indices": VALUE,
                    "allow_view": VALUE, "allow_fine_tuning": VALUE, "organization": VALUE, "group": NULL,
                    "is_blocking": VALUE}
TOKENIZE = {"count": VALUE, "max_model_len": VALUE, "tokens": VALUE, "token_strs": NULL}
DETOKENIZE = {"prompt": VALUE}
VERSION = {"version": VALUE}
ERROR = {"error": VALUE}
ERROR_INFO = {"message": VALUE, "type": VALUE, "param": ANY, "code": ANY}

MESSAGES = [{"role": "user", "content": "hello there"}]


def assert_shape(obj: dict, table: dict[str, str], where: str = "") -> None:
    assert set(obj) == set(table), f"{where}: extra {set(obj) - set(table)}, missing {set(table) - set(obj)}"
    for key, want in table.items():
        if want == NULL:
            assert obj[key] is None, f"{where}.{key} should be null: {obj[key]!r}"
        elif want == VALUE:
            assert obj[key] is not None, f"{where}.{key} should not be null"


def _events(http, path: str, body: dict) -> list[dict]:
    chunks = []
    with http.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[len("data: "):]))
    return chunks


def test_chat_whole(http):
    body = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4}).json()
    assert_shape(body, CHAT_RESPONSE, "response")
    assert_shape(body["choices"][0], CHAT_CHOICE, "choice")
    assert_shape(body["choices"][0]["message"], CHAT_MESSAGE, "message")
    assert_shape(body["usage"], USAGE, "usage")
    with_ids = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                       "return_token_ids": True, "logprobs": True}).json()
    assert_shape(with_ids, {**CHAT_RESPONSE, "prompt_token_ids": VALUE}, "response with ids")
    assert_shape(with_ids["choices"][0], {**CHAT_CHOICE, "token_ids": VALUE, "logprobs": VALUE}, "choice with ids")


@pytest.mark.parametrize("logprobs", [False, True])  # the fast path and the pydantic one
def test_chat_stream(http, logprobs):
    chunks = _events(http, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 4,
                                                    "ignore_eos": True, "logprobs": logprobs})
    role, *middle, last = chunks
    assert_shape(role, CHAT_ROLE_CHUNK, "role chunk")
    assert_shape(role["choices"][0], CHAT_ROLE_CHOICE, "role choice")
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    # a slow client gets the tokens coalesced into fewer chunks (even all in the final one), so middle may be empty
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in (*middle, last))
    for chunk in middle:
        assert_shape(chunk, CHUNK_HEAD, "chunk")
        assert_shape(chunk["choices"][0], CHAT_CHOICE_CHUNK, "choice chunk")
        assert set(chunk["choices"][0]["delta"]) <= {"content"}
    assert_shape(last, CHUNK_HEAD, "final chunk")
    assert_shape(last["choices"][0], CHAT_FINAL_CHOICE, "final choice")
    assert (last["choices"][0]["logprobs"] is not None) == logprobs


def test_chat_stream_usage_and_ids(http):
    chunks = _events(http, "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "max_tokens": 3,
                                                    "return_token_ids": True, "ignore_eos": True,
                                                    "stream_options": {"include_usage": True}})
    assert_shape(chunks[0], {**CHAT_ROLE_CHUNK, "prompt_token_ids": VALUE}, "role chunk")
    for chunk in chunks[1:-1]:
        table = CHAT_FINAL_CHOICE if chunk["choices"][0]["finish_reason"] is not None else CHAT_CHOICE_CHUNK
        assert_shape(chunk["choices"][0], {**table, "token_ids": VALUE}, "choice chunk")
    usage = chunks[-1]
    assert_shape(usage, USAGE_CHUNK, "usage chunk")
    assert usage["choices"] == [] and None not in usage["usage"].values()
    continuous = _events(http, "/v1/chat/completions", {
        "model": MODEL, "messages": MESSAGES, "max_tokens": 3,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert_shape(continuous[0], {**CHAT_ROLE_CHUNK, "usage": VALUE}, "role chunk with usage")
    assert all(c["usage"] is not None for c in continuous)


def test_completion_whole(http):
    body = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4}).json()
    assert_shape(body, COMPLETION_RESPONSE, "response")
    assert_shape(body["choices"][0], COMPLETION_CHOICE, "choice")
    assert_shape(body["usage"], USAGE, "usage")
    full = http.post("/v1/completions", json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "logprobs": 1,
                                              "return_token_ids": True, "prompt_logprobs": 1}).json()
    assert_shape(full["choices"][0], {**COMPLETION_CHOICE, "logprobs": VALUE, "token_ids": VALUE,
                                      "prompt_token_ids": VALUE, "prompt_logprobs": VALUE}, "choice with all")


@pytest.mark.parametrize("extra", [{}, {"logprobs": 1}, {"return_token_ids": True}])
def test_completion_stream(http, extra):
    chunks = _events(http, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 4,
                                               "ignore_eos": True, "stream_options": {"include_usage": True},
                                               **extra})
    *text, usage = chunks
    ids = VALUE if extra.get("return_token_ids") else NULL
    for k, chunk in enumerate(text):
        assert_shape(chunk, CHUNK_HEAD, "chunk")
        want = {**COMPLETION_CHUNK_CHOICE, "token_ids": ids, "prompt_token_ids": ids if k == 0 else NULL}
        assert_shape(chunk["choices"][0], want, "choice chunk")
    assert text[-1]["choices"][0]["finish_reason"] == "length"
    assert_shape(usage, USAGE_CHUNK, "usage chunk")
    assert usage["choices"] == []


def test_models(http):
    body = http.get("/v1/models").json()
    assert_shape(body, MODEL_LIST, "list")
    for card in body["data"]:
        assert_shape(card, MODEL_CARD, "card")
        assert len(card["permission"]) == 1
        assert_shape(card["permission"][0], MODEL_PERMISSION, "permission")
    assert_shape(http.get(f"/v1/models/{MODEL}").json(), MODEL_CARD, "one card")


def test_tokenize_detokenize_version(http):
    tok = http.post("/tokenize", json={"model": MODEL, "prompt": "hello"}).json()
    assert_shape(tok, TOKENIZE, "tokenize")
    strs = http.post("/tokenize", json={"model": MODEL, "prompt": "hello", "return_token_strs": True}).json()
    assert_shape(strs, {**TOKENIZE, "token_strs": VALUE}, "tokenize with strs")
    assert_shape(http.post("/detokenize", json={"model": MODEL, "tokens": tok["tokens"]}).json(), DETOKENIZE,
                 "detokenize")
    assert_shape(http.get("/version").json(), VERSION, "version")


@pytest.mark.parametrize(("path", "body", "status"), [
    ("/v1/chat/completions", {"model": "nope", "messages": MESSAGES}, 404),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "many"}, 400),
    ("/tokenize", {"model": MODEL}, 400),
])
def test_error_bodies(http, path, body, status):
    resp = http.post(path, json=body)
    assert resp.status_code == status
    assert_shape(resp.json(), ERROR, "error")
    assert_shape(resp.json()["error"], ERROR_INFO, "error info")


def test_openai_sdk_reads_every_shape(live):
    client = openai.OpenAI(base_url=live.v1, api_key="x")
    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert chat.choices[0].message.refusal is None and chat.service_tier is None
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, stream=True,
                                                stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
    done = client.completions.create(model=MODEL, prompt="hi", max_tokens=3)
    assert done.choices[0].finish_reason in ("stop", "length")
    assert [m.id for m in client.models.list()][0] == MODEL
