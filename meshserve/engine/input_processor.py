"""The front end's input side: prompt -> token ids, validation, and the fan-out of n > 1 into core requests.

Everything a request can be refused for is checked here, before anything reaches the core, so an error is
raised to the caller directly (HTTP 400) rather than coming back a step later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from meshserve.engine.bad_words import tokenize_bad_words
from meshserve.engine.messages import CoreInfo, EngineCoreRequest
from meshserve.engine.request_fit import check_request_fits
from meshserve.errors import InvalidArgumentError, ModelLoadError, PromptTooLongError
from meshserve.sampling import SamplingParams
from meshserve.structured.grammar import check_structured_outputs

PromptType = str | dict | list[int]
_NONE = object()  # no bad token id found


def load_tokenizer(path: str | None):
    """The model's transformers tokenizer, or None for a model without one."""
    if not path:
        return None
    from meshserve.models import direct_tokenizer  # AutoTokenizer's result, mostly without importing it

    try:
        return direct_tokenizer.load(path, local_files_only=True)
    except (OSError, ValueError) as e:  # transformers' many-line "Couldn't instantiate the backend tokenizer"
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ModelLoadError(f"cannot load a tokenizer from {path} ({first}); it needs tokenizer.json or "
                             "tokenizer_config.json with its vocabulary (--tokenizer names another folder)") from None


def child_request_ids(request_id: str, n: int) -> list[str]:
    """Core request ids of a request's n completions (the request's own id when n == 1)."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


@dataclass
class ProcessedRequest:
    """A validated request: its prompt, its parameters, and the core requests of its n completions."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    core_requests: list[EngineCoreRequest]
    slo_ttft_s: float | None = None  # the time-to-first-token target that applies (its own or the server's)


class InputProcessor:
    """Validates and tokenizes requests against what the core reported of itself (CoreInfo)."""

    def __init__(self, info: CoreInfo, tokenizer: Any | None):
        self.info = info
        self.tokenizer = tokenizer
        eos = set(info.eos_token_ids)
        if tokenizer is not None and isinstance(tokenizer.eos_token_id, int):
            eos.add(tokenizer.eos_token_id)
        self.eos_token_ids = eos

    @staticmethod
    def needs_tokenizer(prompt: PromptType) -> bool:
        """Whether processing this prompt calls the tokenizer (text, not ids)."""
        if isinstance(prompt, dict):
            return "prompt_token_ids" not in prompt
        return isinstance(prompt, str)

    def tokenize_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            other = sorted(map(str, set(prompt) - {"prompt", "prompt_token_ids"}))
            if other:  # vLLM's multi_modal_data, prompt_embeds, cache_salt, ...: refused, never silently dropped
                raise InvalidArgumentError(f"prompt dict key(s) not supported: {', '.join(other)} (meshserve takes "
                                           "'prompt' or 'prompt_token_ids'; text models only)", param="prompt")
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if isinstance(ids, (str, bytes, dict)) or not hasattr(ids, "__iter__"):  # list(None) would raise
                    raise InvalidArgumentError(f"prompt_token_ids must be a list of token ids, got {ids!r}",
                                               param="prompt")
                return prompt.get("prompt"), list(ids)
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise InvalidArgumentError("prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, list):
            return None, list(prompt)
        if not isinstance(prompt, str):
            raise InvalidArgumentError(f"prompt must be a string or token ids, got {type(prompt).__name__}",
                                       param="prompt")
        if self.tokenizer is None:
            raise InvalidArgumentError("this model has no tokenizer: send prompt_token_ids", param="prompt")
        return prompt, self.tokenizer(prompt).input_ids

    def process(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                arrival_time: float | None = None, priority: int = 0, slo_ttft_s: float | None = None,
                slo_tpot_s: float | None = None) -> ProcessedRequest:
        """Validate and tokenize; raises InvalidArgumentError / PromptTooLongError.

        priority orders the queue under --scheduling-policy priority (lower first); slo_ttft_s / slo_tpot_s
        are this request's service-level targets (None: the server's)."""
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidArgumentError(f"priority must be an integer, got {priority!r}", param="priority")
        if priority != 0 and self.info.scheduling_policy != "priority":  # vLLM refuses it too, not ignoring it
            raise InvalidArgumentError(f"priority {priority} needs --scheduling-policy priority (this engine serves "
                                       "first come first served)", param="priority")
        for name, value in (("slo.ttft_ms", slo_ttft_s), ("slo.tpot_ms", slo_tpot_s)):
            if value is not None and not value > 0:
                raise InvalidArgumentError(f"{name} must be > 0", param=name)
        params = (params or SamplingParams()).clone()
        params.validate()
        text, token_ids = self.tokenize_prompt(prompt)
        info = self.info
        vocab = info.vocab_size
        if not token_ids:
            raise InvalidArgumentError("the prompt is empty", param="prompt")
        if params.truncate_prompt_tokens is not None:
            keep = self._truncation(params.truncate_prompt_tokens)
            if len(token_ids) > keep:  # the last N tokens: what the model reads next to the answer
                text, token_ids = None, token_ids[-keep:]  # the text no longer matches: decode ids if needed
        bad = next((t for t in token_ids if not isinstance(t, int) or t < 0 or t >= vocab), _NONE)
        if bad is not _NONE:  # named, in vLLM's words
            raise InvalidArgumentError(f"Token id {bad!r} is out of vocabulary (prompt token ids must be integers in "
                                       f"[0, {vocab}))", param="prompt")
        if any(t >= vocab for t in params.stop_token_ids):  # out of range, they crash the min_tokens ban
            raise InvalidArgumentError(f"stop_token_ids must be in [0, {vocab})", param="stop_token_ids")
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            raise InvalidArgumentError(f"logit_bias keys must be token ids in [0, {vocab})", param="logit_bias")
        if params.allowed_token_ids is not None and any(t >= vocab for t in params.allowed_token_ids):
            raise InvalidArgumentError(f"allowed_token_ids must be token ids in [0, {vocab})",
                                       param="allowed_token_ids")
        params._bad_words_token_ids = self._bad_words(params.bad_words, vocab)
        if params.structured_outputs is not None:  # a bad schema is a 400 here, never a failed compile later
            if self.tokenizer is None:
                raise InvalidArgumentError("structured outputs need the model's tokenizer, and it has none",
                                           param="structured_outputs")
            check_structured_outputs(params.structured_outputs)
        max_len, capacity = info.max_model_len, info.capacity_tokens
        if len(token_ids) >= max_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; max_model_len is {max_len} (room for at least one "
                "new token is needed)", param="prompt")
        if len(token_ids) >= capacity:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; the KV cache holds {capacity} (room for at least one new "
                "token is needed)", param="prompt")
        # max_tokens unset: up to the context's end, or the KV pool's where it holds less (a pool smaller than
        # max_model_len refused every request that left it unset, blaming a max_tokens the client never sent)
        max_tokens = params.max_tokens if params.max_tokens is not None else min(max_len, capacity) - len(token_ids)
        check_request_fits(len(token_ids), max_tokens, max_model_len=max_len, capacity_tokens=capacity,
                           enable_chunked_prefill=info.enable_chunked_prefill,
                           max_num_batched_tokens=info.max_num_batched_tokens)
        params._all_stop_token_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            params._all_stop_token_ids |= self.eos_token_ids

        arrival = arrival_time if arrival_time is not None else time.monotonic()
        core_requests = []
        for i, child_id in enumerate(child_request_ids(request_id, params.n)):
            child = params
            if params.n > 1:
                child = params.clone()
                child.n = 1
                if params.seed is not None:
                    child.seed = params.seed + i  # distinct but reproducible samples
                if i > 0:
                    child.prompt_logprobs = None  # the prompt is scored once, by the first completion
                child._all_stop_token_ids = params._all_stop_token_ids
            core_requests.append(EngineCoreRequest(child_id, token_ids, child, max_tokens, arrival, priority,
                                                   slo_ttft_s, slo_tpot_s))
        return ProcessedRequest(request_id, text, token_ids, params, arrival, core_requests,
                                slo_ttft_s if slo_ttft_s is not None else info.slo_ttft_s)

    def _truncation(self, n: int) -> int:
        """How many prompt tokens truncate_prompt_tokens keeps: n, or max_model_len for -1 (vLLM's rule);
        more than max_model_len is a 400, as in vLLM."""
        max_len = self.info.max_model_len
        if n == -1:
            return max_len
        if n > max_len:
            raise InvalidArgumentError(f"truncate_prompt_tokens ({n}) is greater than max_model_len ({max_len})",
                                       param="truncate_prompt_tokens")
        return n

    def _bad_words(self, words: list[str] | None, vocab: int) -> list[list[int]]:
        if not words:
            return []
        if self.tokenizer is None:
            raise InvalidArgumentError("bad_words need the model's tokenizer, and it has none", param="bad_words")
        sequences = tokenize_bad_words(self.tokenizer, words)
        if any(t >= vocab for seq in sequences for t in seq):  # a tokenizer larger than the model's vocabulary
            raise InvalidArgumentError(f"bad_words tokenize to ids outside the model's vocabulary [0, {vocab})",
                                       param="bad_words")
        return sequences
