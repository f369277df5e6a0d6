"""Every request field of vLLM 0.26's OpenAI models (chat, completions, responses, tokenize, detokenize), and
OpenAI's own, through the live tiny server: each is honoured with vLLM's meaning ("same"), accepted and ignored
where vLLM ignores it too ("ignored"), or refused with a 400 naming it ("refused"), never silently dropped where
vLLM would honour it. Then behaviour checks of the fields implemented for this parity: request_id, cache_salt,
reasoning_effort, add_special_tokens (completions), nulls as defaults, vllm_xargs, spaces_between_special_tokens
and the Responses fields that take the chat endpoint's meaning."""

from __future__ import annotations

import json

import pytest

from meshserve.serve.config import ServeConfig
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from meshserve.serve.responses_input import chat_request_of
from meshserve.serve.responses_protocol import ResponsesRequest
from meshserve.serve.sampling_params import chat_sampling_params, completion_sampling_params
from tests.serve.conftest import MODEL, adding_bos, start_server
from tests.serve.test_bad_inputs import assert_error_shape

CHAT, COMPL, RESP, TOK, DETOK = "/v1/chat/completions", "/v1/completions", "/v1/responses", "/tokenize", "/detokenize"
USER = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
BASE = {
    CHAT: {"model": MODEL, "messages": USER, "max_tokens": 2, "temperature": 0},
    COMPL: {"model": MODEL, "prompt": [5, 17, 40], "max_tokens": 2, "temperature": 0},
    RESP: {"model": MODEL, "input": "hi", "max_output_tokens": 2, "temperature": 0},
    TOK: {"model": MODEL, "prompt": "hi"},
    DETOK: {"model": MODEL, "tokens": [5, 17]},
}
TOK_CHAT = {"model": MODEL, "messages": USER}  # /tokenize of a conversation (vLLM's TokenizeChatRequest)

# vLLM 0.26's fields, model by model (vllm/entrypoints/openai/*/protocol.py, vllm/entrypoints/serve/tokenize)
VLLM_FIELDS = {
    "ChatCompletionRequest": (CHAT, ChatCompletionRequest, """messages model frequency_penalty logit_bias logprobs
        top_logprobs max_tokens max_completion_tokens n presence_penalty response_format seed stop stream
        stream_options temperature top_p tools tool_choice reasoning_effort thinking_token_budget include_reasoning
        parallel_tool_calls user use_beam_search top_k min_p repetition_penalty length_penalty stop_token_ids
        include_stop_str_in_output ignore_eos min_tokens skip_special_tokens spaces_between_special_tokens
        truncate_prompt_tokens truncation_side prompt_logprobs logprob_token_ids allowed_token_ids bad_words echo
        add_generation_prompt continue_final_message add_special_tokens documents chat_template chat_template_kwargs
        media_io_kwargs mm_processor_kwargs structured_outputs priority request_id return_tokens_as_token_ids
        return_token_ids return_token_offsets return_prompt_text return_assistant_tokens_mask cache_salt
        kv_transfer_params ec_transfer_params vllm_xargs repetition_detection"""),
    "CompletionRequest": (COMPL, CompletionRequest, """model prompt echo frequency_penalty logit_bias logprobs
        max_tokens n presence_penalty seed stop stream stream_options suffix temperature top_p user use_beam_search
        top_k min_p repetition_penalty length_penalty stop_token_ids include_stop_str_in_output ignore_eos min_tokens
        skip_special_tokens spaces_between_special_tokens truncate_prompt_tokens truncation_side allowed_token_ids
        prompt_logprobs logprob_token_ids bad_words prompt_embeds add_special_tokens response_format
        structured_outputs priority request_id return_tokens_as_token_ids return_token_ids return_token_offsets
        cache_salt kv_transfer_params ec_transfer_params vllm_xargs repetition_detection thinking_token_budget"""),
    "ResponsesRequest": (RESP, ResponsesRequest, """background include input instructions max_output_tokens
        max_tool_calls metadata model logit_bias parallel_tool_calls previous_response_id prompt reasoning
        include_reasoning service_tier store stream temperature text tool_choice tools top_logprobs top_p top_k
        truncation user skip_special_tokens include_stop_str_in_output presence_penalty frequency_penalty
        prompt_cache_key request_id media_io_kwargs mm_processor_kwargs priority cache_salt enable_response_messages
        previous_input_messages structured_outputs repetition_penalty seed stop ignore_eos vllm_xargs
        kv_transfer_params ec_transfer_params chat_template_kwargs"""),
    "TokenizeCompletionRequest": (TOK, TokenizeRequest, "model prompt add_special_tokens return_token_strs"),
    "TokenizeChatRequest": (TOK, TokenizeRequest, """model messages add_generation_prompt return_token_strs
        continue_final_message add_special_tokens chat_template chat_template_kwargs media_io_kwargs
        mm_processor_kwargs tools"""),
    "DetokenizeRequest": (DETOK, DetokenizeRequest, "model tokens"),
}

SAME, IGNORED, REFUSED = "same", "ignored", "refused"
_ = None  # "the base request as it is" (the field is in it already)
# (path, field, extra body, treatment); REFUSED rows expect a 400 naming the field. The base body stands for the
# fields it holds (model, messages, prompt, input, max_tokens, temperature, tokens).
TABLE = [
    # -- chat completions ---------------------------------------------------------------------------
    (CHAT, "messages", {}, SAME), (CHAT, "model", {}, SAME), (CHAT, "max_tokens", {}, SAME),
    (CHAT, "temperature", {}, SAME),
    (CHAT, "frequency_penalty", {"frequency_penalty": 0.5}, SAME),
    (CHAT, "logit_bias", {"logit_bias": {"7": 5.0}}, SAME),
    (CHAT, "logprobs", {"logprobs": True}, SAME),
    (CHAT, "top_logprobs", {"logprobs": True, "top_logprobs": 2}, SAME),
    (CHAT, "max_completion_tokens", {"max_completion_tokens": 2}, SAME),
    (CHAT, "n", {"n": 2}, SAME),
    (CHAT, "presence_penalty", {"presence_penalty": 0.5}, SAME),
    (CHAT, "response_format", {"response_format": {"type": "json_object"}}, SAME),
    (CHAT, "seed", {"seed": 7, "temperature": 1.0}, SAME),
    (CHAT, "stop", {"stop": ["\n"]}, SAME),
    (CHAT, "stream", {"stream": True}, SAME),
    (CHAT, "stream_options", {"stream": True, "stream_options": {"include_usage": True,
                                                                 "continuous_usage_stats": True}}, SAME),
    (CHAT, "top_p", {"top_p": 0.9}, SAME),
    (CHAT, "tools", {"tools": TOOLS, "tool_choice": "none"}, SAME),  # "auto" needs --enable-auto-tool-choice
    (CHAT, "tool_choice", {"tools": TOOLS, "tool_choice": "none"}, SAME),
    (CHAT, "reasoning_effort", {"reasoning_effort": "low"}, SAME),
    (CHAT, "thinking_token_budget", {"thinking_token_budget": -1}, SAME),  # vLLM's "unlimited"
    (CHAT, "thinking_token_budget", {"thinking_token_budget": 16}, REFUSED),  # vLLM: needs a reasoning config
    (CHAT, "include_reasoning", {"include_reasoning": False}, SAME),
    (CHAT, "parallel_tool_calls", {"parallel_tool_calls": False}, SAME),
    (CHAT, "user", {"user": "u-1"}, IGNORED),  # vLLM ignores it too
    (CHAT, "use_beam_search", {"use_beam_search": False}, SAME),
    (CHAT, "use_beam_search", {"use_beam_search": True}, REFUSED),
    (CHAT, "top_k", {"top_k": 5}, SAME),
    (CHAT, "min_p", {"min_p": 0.1}, SAME),
    (CHAT, "repetition_penalty", {"repetition_penalty": 1.1}, SAME),
    (CHAT, "length_penalty", {"length_penalty": 1.0}, SAME),
    (CHAT, "length_penalty", {"length_penalty": 0.5}, REFUSED),  # beam search only
    (CHAT, "stop_token_ids", {"stop_token_ids": [7]}, SAME),
    (CHAT, "include_stop_str_in_output", {"include_stop_str_in_output": True}, SAME),
    (CHAT, "ignore_eos", {"ignore_eos": True}, SAME),
    (CHAT, "min_tokens", {"min_tokens": 1}, SAME),
    (CHAT, "skip_special_tokens", {"skip_special_tokens": False}, SAME),
    (CHAT, "spaces_between_special_tokens", {"spaces_between_special_tokens": False}, SAME),
    (CHAT, "truncate_prompt_tokens", {"truncate_prompt_tokens": 4}, SAME),
    (CHAT, "truncation_side", {"truncate_prompt_tokens": 4, "truncation_side": "left"}, SAME),
    (CHAT, "truncation_side", {"truncate_prompt_tokens": 4, "truncation_side": "right"}, REFUSED),
    (CHAT, "prompt_logprobs", {"prompt_logprobs": 1}, SAME),
    (CHAT, "logprob_token_ids", {"logprobs": True, "logprob_token_ids": []}, SAME),
    (CHAT, "logprob_token_ids", {"logprobs": True, "logprob_token_ids": [5, 6]}, REFUSED),
    (CHAT, "allowed_token_ids", {"allowed_token_ids": [5, 6]}, SAME),
    (CHAT, "bad_words", {"bad_words": ["zz"]}, SAME),
    (CHAT, "echo", {"echo": True}, SAME),
    (CHAT, "add_generation_prompt", {"add_generation_prompt": False}, SAME),
    (CHAT, "continue_final_message", {"messages": [*USER, {"role": "assistant", "content": "ok"}],
                                      "add_generation_prompt": False, "continue_final_message": True}, SAME),
    (CHAT, "add_special_tokens", {"add_special_tokens": True}, SAME),
    (CHAT, "documents", {"documents": [{"title": "t", "text": "x"}]}, SAME),
    (CHAT, "chat_template", {"chat_template": "{{ messages[0]['content'] }}"}, SAME),
    (CHAT, "chat_template_kwargs", {"chat_template_kwargs": {"enable_thinking": False}}, SAME),
    (CHAT, "media_io_kwargs", {"media_io_kwargs": {}}, SAME),
    (CHAT, "media_io_kwargs", {"media_io_kwargs": {"video": {"num_frames": 4}}}, REFUSED),
    (CHAT, "mm_processor_kwargs", {"mm_processor_kwargs": None}, SAME),
    (CHAT, "mm_processor_kwargs", {"mm_processor_kwargs": {"num_crops": 4}}, REFUSED),
    (CHAT, "structured_outputs", {"structured_outputs": {"choice": ["a", "b"]}}, SAME),
    (CHAT, "structured_outputs", {"structured_outputs": {"json": {"type": "object"},
                                                         "disable_any_whitespace": True}}, SAME),
    (CHAT, "structured_outputs", {"structured_outputs": {"json": {"type": "object"},
                                                         "whitespace_pattern": " *"}}, REFUSED),
    (CHAT, "priority", {"priority": 0}, SAME),
    (CHAT, "priority", {"priority": 3}, REFUSED),  # vLLM too, without --scheduling-policy priority
    (CHAT, "request_id", {"request_id": "parity-chat"}, SAME),
    (CHAT, "return_tokens_as_token_ids", {"logprobs": True, "return_tokens_as_token_ids": True}, SAME),
    (CHAT, "return_token_ids", {"return_token_ids": False}, SAME),
    (CHAT, "return_token_ids", {"return_token_ids": True}, SAME),
    (CHAT, "return_token_ids", {"return_token_ids": None}, SAME),
    (CHAT, "return_token_offsets", {"return_token_offsets": True}, IGNORED),  # vLLM: /render only
    (CHAT, "return_prompt_text", {"return_prompt_text": True}, REFUSED),
    (CHAT, "return_assistant_tokens_mask", {"return_assistant_tokens_mask": True}, IGNORED),  # vLLM: /render only
    (CHAT, "cache_salt", {"cache_salt": "tenant-a"}, SAME),
    (CHAT, "cache_salt", {"cache_salt": ""}, REFUSED),  # vLLM: a non-empty string
    (CHAT, "kv_transfer_params", {"kv_transfer_params": None}, SAME),
    (CHAT, "ec_transfer_params", {"ec_transfer_params": {"do_remote_decode": True}}, REFUSED),
    (CHAT, "vllm_xargs", {"vllm_xargs": {"plugin": "x", "k": [1, 2.5]}}, SAME),
    (CHAT, "repetition_detection", {"repetition_detection": {"max_pattern_size": 0}}, SAME),
    (CHAT, "repetition_detection", {"repetition_detection": {"max_pattern_size": 8, "min_count": 3}}, REFUSED),
    # OpenAI's own, beyond vLLM's model (vLLM ignores them all)
    (CHAT, "metadata", {"metadata": {"k": "v"}}, IGNORED), (CHAT, "store", {"store": True}, IGNORED),
    (CHAT, "service_tier", {"service_tier": "auto"}, IGNORED),
    (CHAT, "prediction", {"prediction": {"type": "content", "content": "x"}}, IGNORED),  # a latency hint
    (CHAT, "prompt_cache_key", {"prompt_cache_key": "k"}, IGNORED),
    (CHAT, "safety_identifier", {"safety_identifier": "s"}, IGNORED),
    (CHAT, "verbosity", {"verbosity": "low"}, IGNORED),
    (CHAT, "modalities", {"modalities": ["text"]}, SAME),
    (CHAT, "modalities", {"modalities": ["text", "audio"]}, REFUSED),
    (CHAT, "audio", {"audio": {"voice": "alloy", "format": "wav"}}, REFUSED),
    (CHAT, "web_search_options", {"web_search_options": {}}, REFUSED),
    (CHAT, "functions", {"functions": [{"name": "f"}]}, REFUSED),
    (CHAT, "function_call", {"function_call": "auto"}, REFUSED),
    (CHAT, "guided_json", {"guided_json": {"type": "object"}}, SAME),  # vLLM 0.26 dropped guided_*: kept here
    # nulls: vLLM's `X | None` fields read null as their default
    *[(CHAT, f, {f: None}, SAME) for f in ("n", "stream", "logprobs", "frequency_penalty", "presence_penalty",
                                           "parallel_tool_calls", "return_tokens_as_token_ids", "top_logprobs")],
    (CHAT, "stream_options", {"stream": True, "stream_options": {"include_usage": None}}, SAME),
    # -- completions --------------------------------------------------------------------------------
    (COMPL, "model", {}, SAME), (COMPL, "prompt", {}, SAME), (COMPL, "max_tokens", {}, SAME),
    (COMPL, "temperature", {}, SAME),
    (COMPL, "echo", {"echo": True}, SAME),
    (COMPL, "frequency_penalty", {"frequency_penalty": 0.5}, SAME),
    (COMPL, "logit_bias", {"logit_bias": {"7": 5.0}}, SAME),
    (COMPL, "logprobs", {"logprobs": 2}, SAME),
    (COMPL, "n", {"n": 2}, SAME),
    (COMPL, "presence_penalty", {"presence_penalty": 0.5}, SAME),
    (COMPL, "seed", {"seed": 7, "temperature": 1.0}, SAME),
    (COMPL, "stop", {"stop": "\n"}, SAME),
    (COMPL, "stream", {"stream": True}, SAME),
    (COMPL, "stream_options", {"stream": True, "stream_options": {"include_usage": True}}, SAME),
    (COMPL, "suffix", {"suffix": "x"}, REFUSED),
    (COMPL, "top_p", {"top_p": 0.9}, SAME),
    (COMPL, "user", {"user": "u"}, IGNORED),
    (COMPL, "use_beam_search", {"use_beam_search": True}, REFUSED),
    (COMPL, "top_k", {"top_k": 5}, SAME), (COMPL, "min_p", {"min_p": 0.1}, SAME),
    (COMPL, "repetition_penalty", {"repetition_penalty": 1.1}, SAME),
    (COMPL, "length_penalty", {"length_penalty": 2.0}, REFUSED),
    (COMPL, "stop_token_ids", {"stop_token_ids": [7]}, SAME),
    (COMPL, "include_stop_str_in_output", {"include_stop_str_in_output": True}, SAME),
    (COMPL, "ignore_eos", {"ignore_eos": True}, SAME), (COMPL, "min_tokens", {"min_tokens": 1}, SAME),
    (COMPL, "skip_special_tokens", {"skip_special_tokens": False}, SAME),
    (COMPL, "spaces_between_special_tokens", {"spaces_between_special_tokens": False}, SAME),
    (COMPL, "truncate_prompt_tokens", {"truncate_prompt_tokens": 2}, SAME),
    (COMPL, "truncation_side", {"truncate_prompt_tokens": 2, "truncation_side": None}, SAME),
    (COMPL, "truncation_side", {"truncate_prompt_tokens": 2, "truncation_side": "right"}, REFUSED),
    (COMPL, "allowed_token_ids", {"allowed_token_ids": [5, 6]}, SAME),
    (COMPL, "prompt_logprobs", {"prompt_logprobs": 1}, SAME),
    (COMPL, "logprob_token_ids", {"logprobs": 1, "logprob_token_ids": [5]}, REFUSED),
    (COMPL, "bad_words", {"bad_words": ["zz"]}, SAME),
    (COMPL, "prompt_embeds", {"prompt_embeds": None}, SAME),
    (COMPL, "prompt_embeds", {"prompt_embeds": "AAAA"}, REFUSED),
    (COMPL, "add_special_tokens", {"prompt": "hi", "add_special_tokens": False}, SAME),
    (COMPL, "response_format", {"response_format": {"type": "text"}}, SAME),
    (COMPL, "structured_outputs", {"structured_outputs": {"regex": "[ab]+"}}, SAME),
    (COMPL, "priority", {"priority": 0}, SAME),
    (COMPL, "request_id", {"request_id": "parity-cmpl"}, SAME),
    (COMPL, "return_tokens_as_token_ids", {"logprobs": 1, "return_tokens_as_token_ids": True}, SAME),
    (COMPL, "return_token_ids", {"return_token_ids": True}, SAME),
    (COMPL, "return_token_offsets", {"return_token_offsets": True}, IGNORED),
    (COMPL, "cache_salt", {"cache_salt": "tenant-a"}, SAME),
    (COMPL, "kv_transfer_params", {"kv_transfer_params": None}, SAME),
    (COMPL, "ec_transfer_params", {"ec_transfer_params": {"x": 1}}, REFUSED),
    (COMPL, "vllm_xargs", {"vllm_xargs": {"k": 1}}, SAME),
    (COMPL, "repetition_detection", {"repetition_detection": None}, SAME),
    (COMPL, "repetition_detection", {"repetition_detection": {"max_pattern_size": 4, "min_count": 2}}, REFUSED),
    (COMPL, "thinking_token_budget", {"thinking_token_budget": 0}, REFUSED),
    (COMPL, "best_of", {"best_of": 1}, SAME), (COMPL, "best_of", {"best_of": 3}, REFUSED),  # OpenAI's
    *[(COMPL, f, {f: None}, SAME) for f in ("echo", "max_tokens", "n", "stream", "frequency_penalty",
                                            "presence_penalty", "return_token_ids", "return_tokens_as_token_ids")],
    # -- responses ----------------------------------------------------------------------------------
    (RESP, "input", {}, SAME), (RESP, "model", {}, SAME), (RESP, "max_output_tokens", {}, SAME),
    (RESP, "temperature", {}, SAME),
    (RESP, "background", {"background": False}, SAME), (RESP, "background", {"background": True}, REFUSED),
    (RESP, "include", {"include": ["message.output_text.logprobs"]}, SAME),
    (RESP, "instructions", {"instructions": "be brief"}, SAME),
    (RESP, "max_tool_calls", {"max_tool_calls": 2}, IGNORED),  # vLLM: built-in tools' loops only
    (RESP, "metadata", {"metadata": {"k": "v"}}, SAME),  # echoed in the response, as OpenAI's
    (RESP, "logit_bias", {"logit_bias": {"7": 5.0}}, SAME),
    (RESP, "parallel_tool_calls", {"parallel_tool_calls": False}, SAME),
    (RESP, "previous_response_id", {"previous_response_id": "resp_none"}, REFUSED),  # no --responses-store-size
    (RESP, "prompt", {"prompt": {"id": "pmpt_1"}}, REFUSED),  # vLLM too
    (RESP, "reasoning", {"reasoning": {"effort": "low"}}, SAME),
    (RESP, "reasoning", {"reasoning": {"effort": "enormous"}}, REFUSED),
    (RESP, "include_reasoning", {"include_reasoning": False}, SAME),
    (RESP, "service_tier", {"service_tier": "auto"}, IGNORED),
    (RESP, "store", {"store": False}, SAME),
    (RESP, "stream", {"stream": True}, SAME),
    (RESP, "text", {"text": {"format": {"type": "text"}}}, SAME),
    (RESP, "tool_choice", {"tools": [{"type": "function", "name": "f"}], "tool_choice": "none"}, SAME),
    (RESP, "tools", {"tools": [{"type": "function", "name": "f"}], "tool_choice": "none"}, SAME),
    (RESP, "top_logprobs", {"include": ["message.output_text.logprobs"], "top_logprobs": 2}, SAME),
    (RESP, "top_p", {"top_p": 0.9}, SAME), (RESP, "top_k", {"top_k": 5}, SAME),
    (RESP, "truncation", {"truncation": "disabled"}, SAME),
    (RESP, "user", {"user": "u"}, IGNORED),
    (RESP, "skip_special_tokens", {"skip_special_tokens": False}, SAME),
    (RESP, "include_stop_str_in_output", {"include_stop_str_in_output": True}, SAME),
    (RESP, "presence_penalty", {"presence_penalty": 0.5}, SAME),
    (RESP, "frequency_penalty", {"frequency_penalty": 0.5}, SAME),
    (RESP, "prompt_cache_key", {"prompt_cache_key": "k"}, IGNORED),  # vLLM ignores it too
    (RESP, "request_id", {"request_id": "resp_parity"}, SAME),
    (RESP, "media_io_kwargs", {"media_io_kwargs": {"image": {"a": 1}}}, REFUSED),
    (RESP, "mm_processor_kwargs", {"mm_processor_kwargs": {"num_crops": 4}}, REFUSED),
    (RESP, "priority", {"priority": 0}, SAME),
    (RESP, "cache_salt", {"cache_salt": "tenant-a"}, SAME),
    (RESP, "enable_response_messages", {"enable_response_messages": True}, REFUSED),
    (RESP, "previous_input_messages", {"previous_input_messages": [{"role": "user", "content": "x"}]}, REFUSED),
    (RESP, "structured_outputs", {"structured_outputs": {"choice": ["a", "b"]}}, SAME),
    (RESP, "structured_outputs", {"structured_outputs": {"choice": ["a"]},
                                  "text": {"format": {"type": "json_object"}}}, REFUSED),  # vLLM: not both
    (RESP, "repetition_penalty", {"repetition_penalty": 1.1}, SAME),
    (RESP, "seed", {"seed": 3}, SAME), (RESP, "stop", {"stop": ["\n"]}, SAME),
    (RESP, "ignore_eos", {"ignore_eos": True}, SAME),
    (RESP, "vllm_xargs", {"vllm_xargs": {"k": "v"}}, SAME),
    (RESP, "kv_transfer_params", {"kv_transfer_params": None}, SAME),
    (RESP, "ec_transfer_params", {"ec_transfer_params": {"x": 1}}, REFUSED),
    (RESP, "chat_template_kwargs", {"chat_template_kwargs": {"enable_thinking": False}}, SAME),
    (RESP, "conversation", {"conversation": "conv_1"}, REFUSED),  # OpenAI's
    *[(RESP, f, {f: None}, SAME) for f in ("stream", "parallel_tool_calls", "top_logprobs", "store")],
    # -- tokenize / detokenize ----------------------------------------------------------------------
    (TOK, "model", {}, SAME), (TOK, "prompt", {}, SAME),
    (TOK, "add_special_tokens", {"add_special_tokens": False}, SAME),
    (TOK, "return_token_strs", {"return_token_strs": True}, SAME),
    (TOK, "return_token_strs", {"return_token_strs": None}, SAME),
    (TOK, "messages", {**TOK_CHAT, "prompt": None}, SAME),
    (TOK, "add_generation_prompt", {**TOK_CHAT, "prompt": None, "add_generation_prompt": False}, SAME),
    (TOK, "continue_final_message", {"prompt": None, "messages": [*USER, {"role": "assistant", "content": "a"}],
                                     "add_generation_prompt": False, "continue_final_message": True}, SAME),
    (TOK, "chat_template", {**TOK_CHAT, "prompt": None, "chat_template": "{{ messages[0]['content'] }}"}, SAME),
    (TOK, "chat_template_kwargs", {**TOK_CHAT, "prompt": None, "chat_template_kwargs": {"x": 1}}, SAME),
    (TOK, "tools", {**TOK_CHAT, "prompt": None, "tools": TOOLS}, SAME),
    (TOK, "media_io_kwargs", {**TOK_CHAT, "prompt": None, "media_io_kwargs": {"image": {"a": 1}}}, REFUSED),
    (TOK, "mm_processor_kwargs", {**TOK_CHAT, "prompt": None, "mm_processor_kwargs": {"num_crops": 4}}, REFUSED),
    (DETOK, "model", {}, SAME), (DETOK, "tokens", {}, SAME),
]


def _body(path: str, extra: dict) -> dict:
    return {k: v for k, v in {**BASE[path], **extra}.items() if not (path == TOK and k == "prompt" and v is None)}


@pytest.fixture(scope="module")
def server(tiny_engine):
    srv = start_server(tiny_engine, ServeConfig(served_model_names=[MODEL], trust_request_chat_template=True))
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    import httpx

    with httpx.Client(base_url=server.base_url, timeout=60) as client:
        yield client


def _ok(resp) -> dict | str:
    assert resp.status_code == 200, resp.text
    return resp.text if resp.headers["content-type"].startswith("text/event-stream") else resp.json()


@pytest.mark.parametrize("path,field,extra,treatment", TABLE,
                         ids=[f"{p.rsplit('/', 1)[-1]}-{f}-{i}" for i, (p, f, _e, _t) in enumerate(TABLE)])
def test_field_is_honoured_ignored_or_refused_by_name(http, path, field, extra, treatment):
    resp = http.post(path, json=_body(path, extra))
    if treatment == REFUSED:
        err = assert_error_shape(resp, 400)
        assert field in (err["param"] or "") or field in err["message"], err
    else:
        body = _ok(resp)
        if isinstance(body, str):
            assert any(end in body for end in ("data: [DONE]", "response.completed", "response.incomplete")), body


def test_every_vllm_field_is_declared_and_in_the_table():
    """No vLLM field is left to the models' extra="ignore" (silently dropped): each is a declared field, and
    the table above sends it."""
    sent = {(p, f) for p, f, _e, _t in TABLE}
    for name, (path, model, fields) in VLLM_FIELDS.items():
        for field in fields.split():
            assert field in model.model_fields, f"{name}.{field} is not declared"
            assert (path, field) in sent, f"{name}.{field} is not in the table"


# -- behaviour of the fields implemented for this parity -----------------------------------------------
def test_request_id_names_the_response(http):
    body = _ok(http.post(CHAT, json=_body(CHAT, {"request_id": "abc-1"})))
    assert body["id"] == "chatcmpl-abc-1"
    chunks = _ok(http.post(CHAT, json=_body(CHAT, {"request_id": "abc-2", "stream": True})))
    ids = {json.loads(line[6:])["id"] for line in chunks.splitlines() if line.startswith("data: {")}
    assert ids == {"chatcmpl-abc-2"}
    assert _ok(http.post(COMPL, json=_body(COMPL, {"request_id": "abc-3"})))["id"] == "cmpl-abc-3"
    assert _ok(http.post(RESP, json=_body(RESP, {"request_id": "resp_abc4"})))["id"] == "resp_abc4"
    a, b = (_ok(http.post(COMPL, json=BASE[COMPL]))["id"] for _ in range(2))  # without it: random, as before
    assert a != b and a.startswith("cmpl-")


def test_echo_with_max_tokens_0_answers_the_prompt_alone(http):
    # vLLM's echo_without_generation (completion/protocol.py to_sampling_params, serving.py): max_tokens 0 with
    # echo generates one token that is not sent: the text and logprobs are the prompt's; usage counts that token
    prompt = [5, 17, 40, 99]
    text = _ok(http.post(DETOK, json={"model": MODEL, "tokens": prompt}))["prompt"]
    body = {**BASE[COMPL], "prompt": prompt, "echo": True, "max_tokens": 0, "logprobs": 2}
    whole = _ok(http.post(COMPL, json=body))
    choice = whole["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(prompt) and lp["token_logprobs"][0] is None
    assert all(isinstance(x, float) for x in lp["token_logprobs"][1:])
    assert whole["usage"]["prompt_tokens"] == 4 and whole["usage"]["completion_tokens"] == 1
    one = _ok(http.post(COMPL, json={**body, "max_tokens": 1}))["choices"][0]  # the token it left out
    assert one["text"].startswith(text) and len(one["logprobs"]["tokens"]) == len(prompt) + 1
    chunks = _ok(http.post(COMPL, json={**body, "stream": True}))
    events = [json.loads(line[6:]) for line in chunks.splitlines() if line.startswith("data: {")]
    streamed = [c for e in events for c in e["choices"]]
    assert "".join(c["text"] for c in streamed) == text
    assert sum(len(c["logprobs"]["tokens"]) for c in streamed) == len(prompt)
    plain = _ok(http.post(COMPL, json={**body, "logprobs": None, "stream": True}))
    assert "".join(json.loads(line[6:])["choices"][0]["text"] for line in plain.splitlines()
                   if line.startswith("data: {")) == text
    # without echo, 0 is still a 400 naming max_tokens (vLLM's SamplingParams: at least 1)
    err = assert_error_shape(http.post(COMPL, json={**BASE[COMPL], "max_tokens": 0}), 400)
    assert err["param"] == "max_tokens"
    assert assert_error_shape(http.post(COMPL, json={**body, "max_tokens": -1}), 400)["param"] == "max_tokens"


def _cached(http, prompt: list[int], **extra) -> int:
    body = _ok(http.post(COMPL, json={**BASE[COMPL], "prompt": prompt, "max_tokens": 1, **extra}))
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def test_cache_salt_separates_the_prefix_cache(http):
    prompt = [300 - i % 17 for i in range(40)]  # 2 full blocks of 16, then 8 tokens: its own, in this test
    assert _cached(http, prompt) == 0
    assert _cached(http, prompt) == 32  # unsalted: shared
    assert _cached(http, prompt, cache_salt="tenant-a") == 0  # a salted request does not see them
    assert _cached(http, prompt, cache_salt="tenant-a") == 32  # but shares with its own salt
    assert _cached(http, prompt, cache_salt="tenant-b") == 0
    assert _cached(http, prompt) == 32  # and the unsalted entries are still there
    chat = {**BASE[CHAT], "messages": [{"role": "user", "content": "salted " * 12}], "max_tokens": 1}
    first = _ok(http.post(CHAT, json={**chat, "cache_salt": "c"}))["usage"]["prompt_tokens_details"]
    again = _ok(http.post(CHAT, json={**chat, "cache_salt": "c"}))["usage"]["prompt_tokens_details"]
    other = _ok(http.post(CHAT, json={**chat, "cache_salt": "d"}))["usage"]["prompt_tokens_details"]
    assert first["cached_tokens"] == 0 and again["cached_tokens"] > 0 and other["cached_tokens"] == 0


# a template whose length shows what it was given: a long marker when thinking is on, then the effort
THINK_TEMPLATE = ("{% if enable_thinking %}THINKING IS ON AND THIS MARKER IS LONG {% endif %}"
                  "[{{ reasoning_effort or '' }}]{% for m in messages %}{{ m['content'] }}{% endfor %}")


def _prompt_tokens(http, **extra) -> int:
    body = _ok(http.post(CHAT, json={**BASE[CHAT], "max_tokens": 1, "chat_template": THINK_TEMPLATE, **extra}))
    return body["usage"]["prompt_tokens"]


def _rendered(http, kwargs: dict) -> int:
    body = _ok(http.post(TOK, json={**TOK_CHAT, "chat_template": THINK_TEMPLATE, "chat_template_kwargs": kwargs}))
    return body["count"]


def test_reasoning_effort_reaches_the_template_as_vllm_hands_it(http):
    high_on = _rendered(http, {"reasoning_effort": "high", "enable_thinking": True})
    assert _rendered(http, {"reasoning_effort": "high", "enable_thinking": False}) < high_on  # the test can tell
    assert _prompt_tokens(http, reasoning_effort="high") == high_on
    assert _prompt_tokens(http, reasoning_effort="none") == _rendered(http, {"reasoning_effort": "none",
                                                                             "enable_thinking": False})
    # the request's own enable_thinking stays; reasoning_effort wins over the kwargs' own reasoning_effort
    assert _prompt_tokens(http, reasoning_effort="high", chat_template_kwargs={
        "enable_thinking": False, "reasoning_effort": "low"}) == _rendered(
        http, {"reasoning_effort": "high", "enable_thinking": False})
    assert _prompt_tokens(http) == _rendered(http, {})  # unset: the template gets neither
    # the Responses API's reasoning.effort is the same (its chat_template_kwargs carry the test's template)
    resp = _ok(http.post(RESP, json={**BASE[RESP], "input": [{"role": "user", "content": "hi"}],
                                     "reasoning": {"effort": "high"},
                                     "chat_template_kwargs": {"chat_template": THINK_TEMPLATE}}))
    assert resp["usage"]["input_tokens"] == high_on
    err = assert_error_shape(http.post(CHAT, json={**BASE[CHAT], "reasoning_effort": "extreme"}), 400)
    assert err["param"] == "reasoning_effort"


@pytest.fixture()
def bos_tokenizer(server):
    with adding_bos(server.allm.tokenizer) as tokenizer:
        yield tokenizer


def test_completions_add_special_tokens(http, bos_tokenizer):
    """vLLM's completions field (default true): false tokenizes a text prompt without the BOS; the echo and the
    prompt logprobs show the same prompt."""
    body = {**BASE[COMPL], "prompt": "hello world", "prompt_logprobs": 0, "echo": True}
    with_bos = _ok(http.post(COMPL, json=body))
    without = _ok(http.post(COMPL, json={**body, "add_special_tokens": False}))
    plain = _ok(http.post(TOK, json={"model": MODEL, "prompt": "hello world", "add_special_tokens": False}))
    assert without["usage"]["prompt_tokens"] == plain["count"]
    assert with_bos["usage"]["prompt_tokens"] == plain["count"] + 1
    assert without["choices"][0]["text"].startswith("hello world")
    ids = [next(iter(p)) for p in without["choices"][0]["prompt_logprobs"][1:]]
    assert "0" not in ids
    # token-id prompts are left as they are
    assert _ok(http.post(COMPL, json={**BASE[COMPL], "add_special_tokens": False}))["usage"]["prompt_tokens"] == 3


def test_nulls_take_the_defaults(http):
    body = _ok(http.post(COMPL, json={**BASE[COMPL], "max_tokens": None, "ignore_eos": True, "n": None,
                                      "echo": None, "stream": None}))
    # vLLM's normalize_null_max_tokens: null is the default, 16 (not up to the context's end)
    assert body["usage"]["completion_tokens"] == 16 and len(body["choices"]) == 1
    chat = _ok(http.post(CHAT, json={**BASE[CHAT], "n": None, "stream": None, "logprobs": None,
                                     "presence_penalty": None, "frequency_penalty": None}))
    assert len(chat["choices"]) == 1 and chat["choices"][0]["logprobs"] is None


def test_sampling_fields_reach_the_params():
    chat = ChatCompletionRequest.model_validate({"messages": USER, "spaces_between_special_tokens": False,
                                                 "vllm_xargs": {"k": [1, "a"]}, "cache_salt": "s",
                                                 "thinking_token_budget": -1, "truncation_side": "left"})
    params = chat_sampling_params(chat)
    assert params.spaces_between_special_tokens is False and params.extra_args == {"k": [1, "a"]}
    assert params.cache_salt == "s" and chat.thinking_token_budget is None
    plain = completion_sampling_params(CompletionRequest.model_validate({"prompt": "x"}))
    assert plain.spaces_between_special_tokens is True and plain.extra_args is None and plain.cache_salt is None
    assert plain.skip_special_tokens is True and plain.include_stop_str_in_output is False  # vLLM's defaults


def test_responses_fields_take_the_chat_meaning():
    req = ResponsesRequest.model_validate({
        "input": "hi", "logit_bias": {"7": 3.0}, "presence_penalty": 0.25, "frequency_penalty": -0.5,
        "skip_special_tokens": False, "include_stop_str_in_output": True, "include_reasoning": False,
        "structured_outputs": {"json": {"type": "object"}}, "chat_template_kwargs": {"enable_thinking": False},
        "kv_transfer_params": None, "vllm_xargs": {"k": "v"}, "cache_salt": "s", "reasoning": {"effort": "low"}})
    chat = chat_request_of(req)
    assert chat.logit_bias == {"7": 3.0} and chat.presence_penalty == 0.25 and chat.frequency_penalty == -0.5
    assert chat.skip_special_tokens is False and chat.include_stop_str_in_output is True
    assert chat.include_reasoning is False and chat.vllm_xargs == {"k": "v"} and chat.cache_salt == "s"
    assert chat.structured_outputs is not None and chat.structured_outputs.json_ == {"type": "object"}
    assert chat.chat_template_kwargs == {"enable_thinking": False, "reasoning_effort": "low"}
    params = chat_sampling_params(chat)
    assert params.logit_bias == {7: 3.0} and params.presence_penalty == 0.25 and params.cache_salt == "s"


def test_responses_structured_outputs_constrain_the_answer(http):
    body = _ok(http.post(RESP, json={**BASE[RESP], "max_output_tokens": 8,
                                     "structured_outputs": {"choice": ["yes", "no"]}}))
    assert body["output"][-1]["content"][0]["text"] in ("yes", "no")


def test_responses_logit_bias_picks_the_token(http):
    token = 120
    text = _ok(http.post(DETOK, json={"model": MODEL, "tokens": [token] * 3}))["prompt"]
    body = _ok(http.post(RESP, json={**BASE[RESP], "max_output_tokens": 3, "ignore_eos": True,
                                     "logit_bias": {str(token): 100.0}}))
    assert body["output"][-1]["content"][0]["text"] == text
