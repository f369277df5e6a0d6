"""vLLM's /tokenize and /detokenize: the server's tokenizer and chat template (with tools), round trip, 400s."""

from __future__ import annotations

from tests.serve.conftest import MODEL
from tests.serve.test_bad_inputs import assert_error_shape


def test_tokenize_detokenize_round_trip(http, live):
    tok = live.allm.tokenizer
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello world", "return_token_strs": True}).json()
    assert r["tokens"] == tok("Hello world").input_ids and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == live.allm.max_model_len and len(r["token_strs"]) == r["count"]
    back = http.post("/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert back["prompt"] == "Hello world"


def test_tokenize_messages_uses_the_chat_template(http, live):
    messages = [{"role": "user", "content": "hi"}]
    r = http.post("/tokenize", json={"messages": messages, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}).json()
    expected = live.allm.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert r["tokens"] == list(getattr(expected, "input_ids", expected))


def test_tokenize_bad_input_is_400(http):
    assert_error_shape(http.post("/tokenize", json={"prompt": "a", "messages": [{"role": "user", "content": "b"}]}),
                       400)
    err = assert_error_shape(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    assert err["param"] == "tokens"
    assert assert_error_shape(http.post("/tokenize", json={"model": "nope", "prompt": "a"}), 404)


def test_tokenize_and_chat_continue_a_prefilled_assistant_turn(http, live):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    body = {"model": MODEL, "messages": messages, "add_generation_prompt": False, "continue_final_message": True}
    r = http.post("/tokenize", json=body).json()
    expected = live.allm.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=False,
                                                       continue_final_message=True)
    assert r["tokens"] == list(getattr(expected, "input_ids", expected))
    chat = http.post("/v1/chat/completions", json={**body, "max_tokens": 2}).json()
    assert chat["usage"]["prompt_tokens"] == r["count"]  # the chat request rendered the same open turn
    both = {**body, "add_generation_prompt": True}
    for path in ("/tokenize", "/v1/chat/completions"):
        assert assert_error_shape(http.post(path, json=both), 400)["param"] == "continue_final_message"
