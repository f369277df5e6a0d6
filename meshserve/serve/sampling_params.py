"""Request models -> SamplingParams (OpenAI defaults; SamplingParams validates and names the bad field)."""

from __future__ import annotations

from meshserve.sampling import RequestOutputKind, SamplingParams
from meshserve.serve.protocol import ChatCompletionRequest, CompletionRequest, SamplingRequest


def _common(req: SamplingRequest) -> dict:
    return {
        "n": req.n,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "top_k": 0 if req.top_k is None else req.top_k,
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
    }


def completion_sampling_params(req: CompletionRequest) -> SamplingParams:
    """max_tokens defaults to 16 (OpenAI); echo with logprobs also scores the prompt."""
    kwargs = _common(req)
    return SamplingParams(max_tokens=req.max_tokens, logprobs=req.logprobs,
                          prompt_logprobs=req.logprobs if (req.echo and req.logprobs is not None) else None,
                          **kwargs)


def chat_sampling_params(req: ChatCompletionRequest) -> SamplingParams:
    """max_completion_tokens wins over max_tokens; neither means 'up to the context length'."""
    kwargs = _common(req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **kwargs)
