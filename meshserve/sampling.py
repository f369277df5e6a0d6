"""SamplingParams: how one request's tokens are chosen, with vLLM's field names and validation."""

from __future__ import annotations

import copy
import enum
import logging
import math
from dataclasses import dataclass, field, fields
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.structured.params import StructuredOutputsParams

logger = logging.getLogger(__name__)

_GREEDY_EPS = 1e-5
_MIN_TEMPERATURE = 1e-2  # vLLM's _MAX_TEMP: a temperature in (0, 0.01) is raised to it, with a warning
# from_optional: these take their default when given as None (vLLM's SamplingParams.from_optional)
_OPTIONAL_DEFAULTS = {"n": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0,
                      "temperature": 1.0, "top_p": 1.0}
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_list(value):
    """A list of value's items when it is a collection (list, tuple, set, range, ...); anything else (stop=5, a
    dict) as it is, for validate() to refuse by name instead of list() raising "'int' object is not iterable"."""
    if isinstance(value, (list, str, bytes, dict)) or not hasattr(value, "__iter__"):
        return value
    return list(value)


class RequestOutputKind(enum.Enum):
    """What each RequestOutput of a running request holds (vLLM's names)."""

    CUMULATIVE = 0  # everything so far: text, token ids and logprobs from the start
    DELTA = 1  # only what is new since the last output of the request (a streaming server's choice)
    FINAL_ONLY = 2  # one output, when the request finishes


@dataclass
class SamplingParams:
    """Sampling parameters of one request (the names and defaults of vLLM's SamplingParams).

    temperature 0 means greedy. top_k <= 0 (or -1) disables top-k; top_p 1 and min_p 0 disable theirs.
    seed makes the request's samples reproducible whatever else is in the batch; with speculative decoding
    only while its steps verify the same proposals (its draws are a stream taken step by step, so preemption
    or another batching that changes how many proposals a step checks changes them; greedy is unaffected).
    stop strings are matched across token boundaries and removed from the output text.
    min_tokens holds back EOS and stop_token_ids until that many tokens are out, and stop strings until one
    more (vLLM's rule).
    logprobs = k returns the chosen token's logprob and the k most likely alternatives at every step;
    prompt_logprobs = k does the same for the prompt tokens.
    structured_outputs constrains the output to a JSON schema, regex, choice or grammar (a dict of vLLM's
    fields is accepted too: {"json": schema}).
    allowed_token_ids: only these ids may be sampled. bad_words: strings whose tokens must not be generated
    (the last token of a word is banned once the output ends with the tokens before it, as in vLLM).
    truncate_prompt_tokens = N keeps the prompt's last N tokens (-1: max_model_len), applied before the
    length check.
    detokenize=False: offline LLM returns token ids only (text ""), as vLLM; stop strings need the text.
    extra_args: vLLM's free-form dict for custom sampling plugins; kept, and read by nothing (as in vLLM,
    whose built-in sampling ignores it too).
    vLLM's normalisations: seed -1 means None, logprobs / prompt_logprobs True mean 1, a temperature in
    (0, 0.01) is raised to 0.01, and duplicate stop_token_ids are dropped.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before sampling, in [-100, 100]
    allowed_token_ids: list[int] | None = None  # every other id is masked out before sampling
    bad_words: list[str] | None = None  # tokenized by the front end into _bad_words_token_ids
    truncate_prompt_tokens: int | None = None  # keep the prompt's last N tokens; -1: max_model_len
    structured_outputs: StructuredOutputsParams | None = None  # grammar the output must follow (xgrammar)
    # prefill/decode disaggregation, vLLM's request field: {"do_remote_decode" | "do_remote_prefill": true,
    # "transfer_id": ...}; checked by the engine core (disagg/coordinator.py)
    kv_transfer_params: dict[str, Any] | None = None
    # vLLM's request field (it carries it with the prompt): the prefix cache shares blocks only between requests of
    # the same salt (block_manager hashes it under the first block); kept out of the repr (request logs): a secret
    cache_salt: str | None = field(default=None, repr=False)
    detokenize: bool = True  # vLLM's: False returns no text (offline LLM), only token ids
    extra_args: dict[str, Any] | None = None  # vLLM's, for custom sampling plugins: nothing here reads it
    # Filled by the engine: EOS ids of the model (unless ignore_eos), merged into the stop set.
    _all_stop_token_ids: set[int] = field(default_factory=set, repr=False)
    # Filled by the front end (it holds the tokenizer): each bad word's token ids, in every spelling banned.
    _bad_words_token_ids: list[list[int]] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = _as_list(self.stop)
        self.stop_token_ids = [] if self.stop_token_ids is None else _as_list(self.stop_token_ids)
        if isinstance(self.stop_token_ids, list) and all(map(_is_int, self.stop_token_ids)):
            self.stop_token_ids = list(dict.fromkeys(self.stop_token_ids))  # duplicates dropped, as in vLLM
        if isinstance(self.seed, int) and not isinstance(self.seed, bool) and self.seed == -1:
            self.seed = None  # vLLM's "no seed"
        if self.logprobs is True:  # vLLM: True asks for the chosen token's logprob and one alternative
            self.logprobs = 1
        if self.prompt_logprobs is True:
            self.prompt_logprobs = 1
        t = self.temperature
        if isinstance(t, (int, float)) and not isinstance(t, bool) and 0.0 < t < _MIN_TEMPERATURE:
            # as vLLM: so tiny a temperature gives inf / nan logits in half precision
            logger.warning("temperature %s is less than %s, which may cause numerical errors nan or inf in "
                           "tensors; it is raised to %s (as vLLM does)", t, _MIN_TEMPERATURE, _MIN_TEMPERATURE)
            self.temperature = _MIN_TEMPERATURE
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _as_list(self.allowed_token_ids)
        if isinstance(self.bad_words, str):
            self.bad_words = [self.bad_words]
        self.bad_words = _as_list(self.bad_words) if self.bad_words else None  # [] asks for nothing, as in vLLM
        if isinstance(self.structured_outputs, dict):  # offline callers may pass vLLM's fields as a dict
            unknown = sorted(set(self.structured_outputs) - {f.name for f in fields(StructuredOutputsParams)})
            if unknown:  # by name, not as __init__'s "unexpected keyword argument"
                raise InvalidArgumentError(f"structured_outputs: unknown field(s) {', '.join(map(str, unknown))}",
                                           param="structured_outputs")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.top_k is None or (isinstance(self.top_k, int) and self.top_k == -1):  # vLLM's older "off"
            self.top_k = 0
        self.validate()

    @classmethod
    def from_optional(cls, **fields) -> SamplingParams:
        """vLLM's SamplingParams.from_optional: n, the penalties, temperature and top_p given as None take
        their defaults; logit_bias keys may be strings of token ids, and biases are clipped to [-100, 100]."""
        for name, default in _OPTIONAL_DEFAULTS.items():
            if fields.get(name) is None:
                fields[name] = default
        bias = fields.get("logit_bias")
        if isinstance(bias, dict):
            bad = []
            clipped = {}
            for token, value in bias.items():
                try:
                    token_id = int(token)
                except (TypeError, ValueError):
                    bad.append(token)
                    continue
                clipped[token_id] = min(100.0, max(-100.0, value)) if isinstance(value, (int, float)) else value
            if bad:
                raise InvalidArgumentError(f"logit_bias contains key(s) that cannot be converted to integer token "
                                           f"ids: {bad!r}", param="logit_bias")
            fields["logit_bias"] = clipped
        return cls(**fields)

    @classmethod
    def from_defaults(cls, defaults: dict | None = None, **fields) -> SamplingParams:
        """Parameters from `fields`; a field given as None (or not given) takes `defaults` (the model's
        generation_config.json), else SamplingParams' own default, as vLLM's front ends do."""
        given = {k: v for k, v in fields.items() if v is not None}
        return cls(**{**(defaults or {}), **given})

    # -- validation -------------------------------------------------------------------------------
    def validate(self) -> None:
        def check(cond: bool, param: str, msg: str) -> None:
            if not cond:
                raise InvalidArgumentError(f"{param} {msg}", param=param)

        # types first: the range checks below compare, and "0.5" >= 0.0 would raise a bare TypeError
        for name in _FLOAT_FIELDS:
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool), name,
                  f"must be a number, got {value!r}")
        check(_is_int(self.n) and self.n >= 1, "n", f"must be an integer >= 1, got {self.n}")
        check(math.isfinite(self.temperature), "temperature", f"must be a finite number, got {self.temperature}")
        check(math.isfinite(self.repetition_penalty), "repetition_penalty",
              f"must be a finite number, got {self.repetition_penalty}")
        check(self.max_tokens is None or (_is_int(self.max_tokens) and self.max_tokens >= 1),
              "max_tokens", f"must be an integer >= 1, got {self.max_tokens}")
        check(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens",
              f"must be an integer >= 0, got {self.min_tokens}")
        check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
              f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(_is_int(self.top_k), "top_k", f"must be an integer, got {self.top_k!r}")
        check(self.top_k >= 0, "top_k", f"must be -1 or 0 (disabled) or >= 1, got {self.top_k}")  # as vLLM
        check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        check(self.repetition_penalty > 0.0, "repetition_penalty",
              f"must be > 0, got {self.repetition_penalty}")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
              f"must be in [-2, 2], got {self.presence_penalty}")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
              f"must be in [-2, 2], got {self.frequency_penalty}")
        # torch.Generator.manual_seed overflows past 64 bits, inside the engine step: reject it here
        check(self.seed is None or (_is_int(self.seed) and -(2**63) <= self.seed < 2**63), "seed",
              f"must be an integer in [-2**63, 2**63), got {self.seed}")
        check(isinstance(self.stop, list) and all(isinstance(s, str) and s for s in self.stop), "stop",
              f"must be a string or a list of non-empty strings, got {self.stop!r}")
        check(isinstance(self.stop_token_ids, list) and all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", f"must be a list of non-negative integers, got {self.stop_token_ids!r}")
        check(self.logprobs is None or (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20),
              "logprobs", f"must be an integer in [0, 20], got {self.logprobs}")
        check(self.prompt_logprobs is None
              or (isinstance(self.prompt_logprobs, int) and 0 <= self.prompt_logprobs <= 20),
              "prompt_logprobs", f"must be an integer in [0, 20], got {self.prompt_logprobs}")
        check(self.logit_bias is None or isinstance(self.logit_bias, dict), "logit_bias",
              f"must be a dict of token id -> bias, got {type(self.logit_bias).__name__}")
        check(self.logit_bias is None or all(
            isinstance(t, int) and t >= 0 and isinstance(b, (int, float)) and -100.0 <= b <= 100.0
            for t, b in self.logit_bias.items()), "logit_bias",
              "must map token ids (non-negative integers) to biases in [-100, 100]")
        check(self.allowed_token_ids is None or isinstance(self.allowed_token_ids, list), "allowed_token_ids",
              f"must be a list of token ids, got {self.allowed_token_ids!r}")
        check(self.allowed_token_ids is None or len(self.allowed_token_ids) > 0, "allowed_token_ids",
              "must not be empty (leave it unset to allow every token)")
        check(self.allowed_token_ids is None or all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                    for t in self.allowed_token_ids),
              "allowed_token_ids", "must be non-negative integers")
        check(self.bad_words is None or (isinstance(self.bad_words, list)
                                         and all(isinstance(w, str) and w.strip() for w in self.bad_words)),
              "bad_words", "must be a string or a list of non-empty strings")
        check(isinstance(self.detokenize, bool), "detokenize", f"must be true or false, got {self.detokenize!r}")
        check(self.detokenize or not self.stop, "stop",
              "strings are only supported when detokenize is True (set detokenize=True to use stop)")
        check(self.extra_args is None or isinstance(self.extra_args, dict), "extra_args",
              f"must be a dict, got {type(self.extra_args).__name__}")
        check(self.cache_salt is None or (isinstance(self.cache_salt, str) and self.cache_salt), "cache_salt",
              "must be a non-empty string if provided")  # vLLM's words
        n = self.truncate_prompt_tokens
        check(n is None or (isinstance(n, int) and not isinstance(n, bool) and (n >= 1 or n == -1)),
              "truncate_prompt_tokens", f"must be an integer >= 1, or -1 (max_model_len), got {n}")

    # -- derived ----------------------------------------------------------------------------------
    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_logit_bias(self) -> bool:
        return bool(self.logit_bias)

    @property
    def uses_token_masks(self) -> bool:
        """allowed_token_ids or bad words: the sampler masks ids this request may not take."""
        return self.allowed_token_ids is not None or bool(self._bad_words_token_ids)

    @property
    def reads_output_history(self) -> bool:
        """Whether sampling the next token reads the tokens generated so far (so they must all be known):
        penalties count them; a bad word of several tokens is banned when the output ends with its prefix."""
        # uses_penalties inline, and no generator for the common case of no bad words: read per row, every step
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or (bool(self._bad_words_token_ids) and any(len(w) > 1 for w in self._bad_words_token_ids)))

    @property
    def uses_grammar(self) -> bool:
        return self.structured_outputs is not None

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def clone(self) -> SamplingParams:
        return copy.deepcopy(self)
