"""SpeculativeConfig: vLLM's --speculative-config JSON, validated into a typed config at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshserve.errors import InvalidArgumentError
from meshserve.json_config import config_dict, config_error, config_object

METHODS = ("ngram", "draft_model", "eagle3")
PLANNED_METHODS = ("eagle", "medusa", "mtp")  # vLLM names refused with "not supported yet"
MAX_SPECULATIVE_TOKENS = 32  # beyond this a verify step costs a prefill and acceptance never gets there
# vLLM keys meshserve has no field for, and what to do instead (the generic "unknown key" line names none)
VLLM_ONLY_KEYS = {
    "quantization": "the draft's quantization is read from its checkpoint (quantization_config in config.json)",
    "max_model_len": "the draft runs to the target's --max-model-len: lower that instead",
    "revision": "give model as a local checkpoint folder",
    "code_revision": "give model as a local checkpoint folder",
    "enforce_eager": "use --enforce-eager (it applies to the draft too)",
    "speculative_token_tree": "tree drafts are not supported; proposals are one chain",
}


@dataclass
class SpeculativeConfig:
    """How proposals are made and how many per step.

    method: "ngram" (prompt lookup over the sequence's own tokens), "draft_model" (a smaller model
    sharing the target's vocabulary) or "eagle3" (an EAGLE-3 head reading the target's hidden states;
    model is its checkpoint folder). disable_by_batch_size: when
    more sequences than this are running, steps run without proposals (speculation costs at large batches).
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    model: str | None = None
    disable_by_batch_size: int | None = None
    draft_tensor_parallel_size: int | None = (
        None  # accepted for vLLM's key; the draft runs on the target's ranks
    )

    @property
    def uses_draft_model(self) -> bool:
        """The proposer runs a model on the ranks (it needs KV blocks ahead of the verified tokens)."""
        return self.method in ("draft_model", "eagle3")

    @property
    def num_lookahead_tokens(self) -> int:
        """KV slots a draft model writes past the target's tokens of a step (its proposals)."""
        return self.num_speculative_tokens if self.uses_draft_model else 0


def _bad(msg: str, key: str | None = None) -> InvalidArgumentError:
    return config_error("speculative_config", msg, key)


def parse_speculative_config(value: Any) -> SpeculativeConfig | None:
    """A SpeculativeConfig from a dict, a JSON string or a SpeculativeConfig (None stays None).

    Keys are vLLM's; defaults follow vLLM (prompt_lookup_min/max both 5 when neither is set, else the one
    given); a model without a method is an EAGLE head when its name says so (as vLLM guesses), else a
    draft model. Every mistake is one InvalidArgumentError line.
    """
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    value = config_object(value, "speculative_config")
    for key, instead in VLLM_ONLY_KEYS.items():
        if key in value:
            raise _bad(f"not supported: {instead}", key)
    d = config_dict(value, SpeculativeConfig, "speculative_config")
    if d.get("method") is None:
        if d.get("model") is None:
            raise _bad(f"method is required (one of {', '.join(METHODS)})", "method")
        d["method"] = _method_from_model_name(d["model"])
    method = d["method"]
    if method in PLANNED_METHODS:
        raise _bad(f"method {method!r} is not supported yet (supported: {', '.join(METHODS)})", "method")
    if method not in METHODS:
        raise _bad(f"unsupported method {method!r} (supported: {', '.join(METHODS)})", "method")
    for key in (
        "num_speculative_tokens",
        "prompt_lookup_min",
        "prompt_lookup_max",
        "disable_by_batch_size",
        "draft_tensor_parallel_size",
    ):
        v = d.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
            raise _bad(f"must be an integer, got {v!r}", key)
    if d.get("num_speculative_tokens") is None:
        raise _bad("is required", "num_speculative_tokens")
    k = d["num_speculative_tokens"]
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise _bad(f"must be in [1, {MAX_SPECULATIVE_TOKENS}], got {k}", "num_speculative_tokens")
    if method == "ngram":
        lo, hi = d.get("prompt_lookup_min"), d.get("prompt_lookup_max")
        if lo is None and hi is None:
            lo = hi = 5
        lo = hi if lo is None else lo
        hi = lo if hi is None else hi
        if lo < 1:
            raise _bad(f"must be >= 1, got {lo}", "prompt_lookup_min")
        if hi < lo:
            raise _bad(f"must be >= prompt_lookup_min ({lo}), got {hi}", "prompt_lookup_max")
        d["prompt_lookup_min"], d["prompt_lookup_max"] = lo, hi
        if d.get("model") is not None:
            raise _bad("ngram takes no model", "model")
    elif not d.get("model"):
        raise _bad(f"method {method} needs a model (a checkpoint folder)", "model")
    dbs = d.get("disable_by_batch_size")
    if dbs is not None and dbs < 1:
        raise _bad(f"must be >= 1, got {dbs}", "disable_by_batch_size")
    dtp = d.get("draft_tensor_parallel_size")
    if dtp is not None and dtp < 1:
        raise _bad(f"must be >= 1, got {dtp}", "draft_tensor_parallel_size")
    return SpeculativeConfig(**d)


def _method_from_model_name(model: Any) -> str:
    """vLLM's guess for a model without a method: an EAGLE checkpoint by its name, else a draft model."""
    name = str(model).lower()
    if "eagle3" in name:
        return "eagle3"
    return "eagle" if "eagle-" in name else "draft_model"
