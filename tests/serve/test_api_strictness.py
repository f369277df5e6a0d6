"""The API is as strict as its schema: strict types, empty prompts refused by the schema, unsupported OpenAI
parameters and malformed tools or schemas refused by name, logit_bias validated and applied, one error-code type, models.retrieve works."""

from __future__ import annotations

import pytest

from tests.serve.conftest import MODEL
from tests.serve.test_bad_inputs import assert_error_shape

CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]

REFUSED = [
    ("boolean token id", COMPL, {"prompt": [[False]]}, "prompt"),
    ("integer boolean", CHAT, {"messages": USER, "add_generation_prompt": 0}, "add_generation_prompt"),
    ("string number", COMPL, {"prompt": [1, 2], "max_tokens": "5"}, "max_tokens"),
    ("empty prompt string", COMPL, {"prompt": ""}, "prompt"),
    ("logit_bias key not a token id", COMPL, {"prompt": [1, 2], "logit_bias": {"hello": 5}}, "logit_bias"),
    ("logit_bias out of range", COMPL, {"prompt": [1, 2], "logit_bias": {"7": 101}}, "logit_bias"),
    ("logit_bias token out of vocab", COMPL, {"prompt": [1, 2], "logit_bias": {"1000000": 1}}, "logit_bias"),
    ("tool parameters not an object schema", CHAT, {"messages": USER, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ("tool_choice required", CHAT, {"messages": USER, "tool_choice": "required"}, "tool_choice"),
    ("response_format invalid schema", CHAT, {"messages": USER, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}}, "response_format"),
    ("functions", CHAT, {"messages": USER, "functions": [{"name": "f"}]}, "functions"),
    ("suffix", COMPL, {"prompt": "x", "suffix": "y"}, "suffix"),
    ("best_of", COMPL, {"prompt": "x", "best_of": 3}, "best_of"),
    ("image content part", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x"}}]}]},
     "messages.0.content"),
]


def test_image_parts_are_refused_in_one_sentence(http):
    body = {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    err = assert_error_shape(http.post(CHAT, json=body), 400)
    assert "type image_url are not supported" in err["message"] and "more errors" not in err["message"], err


@pytest.mark.parametrize("name,path,body,param", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_with_400_naming_the_parameter(http, name, path, body, param):
    err = assert_error_shape(http.post(path, json={"model": MODEL, **body}), 400)
    assert err["param"] == param and isinstance(err["code"], str), err


def test_harmless_values_of_unsupported_parameters_are_accepted(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 2, "tool_choice": "none", "tools": [],
            "response_format": {"type": "text"}}
    assert http.post(CHAT, json=body).status_code == 200


def test_logit_bias_is_applied(http, live):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    forced = http.post(COMPL, json={**body, "logit_bias": {"42": 100}, "logprobs": 0}).json()["choices"][0]
    token_text = live.allm.tokenizer.decode([42])
    assert forced["logprobs"]["tokens"] == [token_text] * 6  # every token is the boosted one
    banned = http.post(COMPL, json={**body, "logit_bias": {"42": -100}, "logprobs": 0}).json()["choices"][0]
    assert token_text not in banned["logprobs"]["tokens"]


def test_error_codes_are_strings_and_models_retrieve(http):
    assert assert_error_shape(http.get("/v1/nothing"), 404)["code"] == "not_found"
    assert assert_error_shape(http.get(COMPL), 405)["code"] == "method_not_allowed"
    card = http.get(f"/v1/models/{MODEL}")
    assert card.status_code == 200 and card.json()["id"] == MODEL
    err = assert_error_shape(http.get("/v1/models/gpt-9"), 404)
    assert err["code"] == "model_not_found"


def test_openai_sdk_models_retrieve(live):
    import openai

    client = openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0)
    assert client.models.retrieve(MODEL).id == MODEL


def test_x_api_key_is_documented(http):
    assert "x-api-key" in http.get("/openapi.json").json()["info"]["description"]
