"""Request models -> SamplingParams; SamplingParams validates and names the bad field.

A field the request leaves unset takes the model's default from its generation_config.json (`defaults`, empty
with --generation-config vllm), else OpenAI's: vLLM's rule, which `meshserve generate` follows too.
"""

from __future__ import annotations

from meshserve.errors import InvalidArgumentError
from meshserve.sampling import RequestOutputKind, SamplingParams
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest
from meshserve.serve.structured_request import structured_outputs_of
from meshserve.structured.params import StructuredOutputsParams


def _logit_bias(req: SamplingRequest) -> dict[int, float] | None:
    """OpenAI's {"token id": bias} with string keys -> {id: bias}; a key that is not a token id is a 400."""
    if not req.logit_bias:
        return None
    bias = {}
    for key, value in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidArgumentError(f"logit_bias keys must be token ids, got {key!r}", param="logit_bias") from None
        if token < 0 or not -100.0 <= value <= 100.0:
            raise InvalidArgumentError(f"logit_bias: {key!r} -> {value} (ids are >= 0, biases in [-100, 100])",
                                       param="logit_bias")
        bias[token] = float(value)
    return bias


def _unsupported(param: str, why: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"{param} is not supported by this server yet ({why})", param=param)


def reject_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """A 400 naming an OpenAI (or vLLM) parameter that would change the answer and that meshserve does not
    implement."""
    if req.use_beam_search:
        raise _unsupported("use_beam_search", "beam search is not implemented")
    if req.length_penalty != 1.0:
        raise _unsupported("length_penalty", "it applies to beam search, which is not implemented")
    if req.prompt_logprobs is not None and req.stream:  # vLLM refuses them too: no chunk carries them
        raise InvalidArgumentError("prompt_logprobs are not available when stream is true",
                                   param="prompt_logprobs")
    if req.truncation_side == "right":
        raise _unsupported("truncation_side", 'only "left" (truncate_prompt_tokens keeps the last tokens)')
    if req.logprob_token_ids:
        raise _unsupported("logprob_token_ids", "use logprobs / top_logprobs")
    if req.thinking_token_budget is not None:  # vLLM refuses it too without a reasoning config
        raise _unsupported("thinking_token_budget", "thinking is not cut short; leave it out or -1")
    if req.repetition_detection is not None and req.repetition_detection.max_pattern_size > 0:
        raise _unsupported("repetition_detection", "the output is not ended on repeated n-grams")
    if req.ec_transfer_params:
        raise _unsupported("ec_transfer_params", "encoder-cache disaggregation: this server runs text models")
    if isinstance(req, CompletionRequest):
        if req.suffix:
            raise _unsupported("suffix", "insertion is not implemented")
        if req.best_of is not None and req.best_of != req.n:
            raise _unsupported("best_of", "use n")
        if req.prompt_embeds:
            raise _unsupported("prompt_embeds", "send text prompts or token ids")
        return
    if req.functions:
        raise _unsupported("functions", "function calling is not implemented")
    if req.function_call not in (None, "none"):
        raise _unsupported("function_call", 'only "none" is accepted')
    for name in ("mm_processor_kwargs", "media_io_kwargs"):
        if getattr(req, name):
            raise _unsupported(name, "this server runs text-only models")
    if req.return_prompt_text:
        raise _unsupported("return_prompt_text", "POST /tokenize renders a conversation")
    if req.audio is not None or any(m != "text" for m in req.modalities or []):
        raise _unsupported("audio" if req.audio is not None else "modalities", "the output is text only")
    if req.web_search_options is not None:
        raise _unsupported("web_search_options", "the model has no web search")


def _common(req: SamplingRequest) -> dict:
    return {
        "n": req.n,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "min_p": req.min_p,
        "presence_penalty": req.presence_penalty,
        "frequency_penalty": req.frequency_penalty,
        "repetition_penalty": req.repetition_penalty,
        "seed": req.seed,
        "stop": req.stop,
        "stop_token_ids": req.stop_token_ids,
        "ignore_eos": req.ignore_eos,
        "min_tokens": req.min_tokens,
        "skip_special_tokens": req.skip_special_tokens,
        "include_stop_str_in_output": req.include_stop_str_in_output,
        # the handlers stream or gather deltas: each step carries only what is new
        "output_kind": RequestOutputKind.DELTA,
        "logit_bias": _logit_bias(req),
        "allowed_token_ids": req.allowed_token_ids,
        "bad_words": req.bad_words,
        "truncate_prompt_tokens": req.truncate_prompt_tokens,
        "kv_transfer_params": req.kv_transfer_params,
        "spaces_between_special_tokens": req.spaces_between_special_tokens,
        "extra_args": req.vllm_xargs or None,  # vLLM's: its extensions' values, read by no built-in sampling
        "cache_salt": req.cache_salt,
    }


def _build(req: SamplingRequest, defaults: dict, max_tokens: int | None, **fields) -> SamplingParams:
    """What the request set wins; an unset field takes the model's default, else SamplingParams' own.
    max_tokens comes resolved (None is meaningful: up to the context length)."""
    given = {k: v for k, v in {**_common(req), **fields}.items() if v is not None}
    return SamplingParams(**{**defaults, **given, "max_tokens": max_tokens})


def completion_sampling_params(req: CompletionRequest, defaults: dict | None = None) -> SamplingParams:
    """max_tokens unset: the model's max_new_tokens, else 16 (OpenAI). Echo with logprobs also scores
    the prompt (one pass serves both it and prompt_logprobs: the larger k, each trimmed to its own)."""
    reject_unsupported(req)
    defaults = defaults or {}
    # (a null max_tokens never gets here as null: the model reads it as unset, vLLM's 16)
    max_tokens = req.max_tokens if "max_tokens" in req.model_fields_set else defaults.get("max_tokens", 16)
    if req.echo_only:
        max_tokens = 1  # vLLM's echo_without_generation: one token, not sent (the answer is the prompt alone)
    asked = [k for k in (req.prompt_logprobs, req.logprobs if req.echo else None) if k is not None]
    return _build(req, defaults, max_tokens, logprobs=req.logprobs, structured_outputs=structured_outputs_of(req),
                  prompt_logprobs=max(asked) if asked else None)


def chat_sampling_params(req: ChatCompletionRequest, defaults: dict | None = None,
                         tool_constraint: StructuredOutputsParams | None = None) -> SamplingParams:
    """max_completion_tokens wins over max_tokens; neither: the model's max_new_tokens, else up to the
    context length. tool_constraint: what tool_choice "required" or a named function imposes."""
    reject_unsupported(req)
    defaults = defaults or {}
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    structured = structured_outputs_of(req)
    if structured is not None and tool_constraint is not None:
        raise InvalidArgumentError("an output constraint (response_format, structured_outputs, guided_*) cannot "
                                   'be combined with tool_choice "required" or a named function', param="tool_choice")
    return _build(req, defaults, max_tokens if max_tokens is not None else defaults.get("max_tokens"),
                  logprobs=logprobs, structured_outputs=structured or tool_constraint,
                  prompt_logprobs=req.prompt_logprobs)
