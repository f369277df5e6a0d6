"""Default sampling parameters from the model's generation_config.json, as vLLM's `--generation-config`.

Model creators put their recommended sampling (e.g. temperature 0.6, top_p 0.9) in generation_config.json;
vLLM applies it to every request that leaves those fields unset, in the server and in offline LLM alike, so
both front ends give the same answers. meshserve does the same. Modes:
  auto    read the model folder's generation_config.json (the default)
  vllm    ignore it: the fields keep SamplingParams' defaults (temperature 1.0, ...)
  FOLDER  read FOLDER/generation_config.json instead
Like vLLM, `do_sample` is not looked at: a file that names a temperature means it.
`--override-generation-config` (vLLM's) sets fields over whichever of these applies, with the same keys.
"""

from __future__ import annotations

import json
import logging
import os

from meshserve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)

GENERATION_CONFIG_MODES = ("auto", "vllm")
# generation_config.json field -> SamplingParams field
_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def load_generation_defaults(model_dir: str | None, mode: str = "auto",
                             fallback: dict[str, float | int] | None = None) -> dict[str, float | int]:
    """SamplingParams keyword defaults the model's generation_config.json sets ({} when none, or mode vllm).

    `fallback` stands in when the file sets none of them (the embedded model, whose GGUF carries none).
    """
    if mode == "vllm":
        return {}
    folder = model_dir if mode == "auto" else mode
    path = os.path.join(folder, "generation_config.json") if folder else None
    fields: dict = {}
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                fields = json.load(f)
        except (OSError, ValueError) as e:
            logger.warning("ignoring unreadable %s: %s", path, e)
    if not isinstance(fields, dict):
        logger.warning("ignoring %s: not a JSON object", path)
        fields = {}
    defaults = {}
    for theirs, ours in _FIELDS.items():
        value = fields.get(theirs)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            defaults[ours] = value
        elif value is not None:  # skipped, as vLLM loads such a file leniently, but not silently
            logger.warning("ignoring %s in %s: not a number (%r)", theirs, path, value)
    source = path
    if not defaults and fallback:
        defaults, source = dict(fallback), "meshserve's defaults for the embedded model"
    if defaults:
        logger.info("default sampling parameters from %s: %s (requests and flags override them; "
                    "--generation-config vllm ignores them)", source,
                    ", ".join(f"{k}={v}" for k, v in defaults.items()))
    return defaults


def generation_overrides(overrides: dict | None) -> dict[str, float | int]:
    """--override-generation-config (generation_config.json's keys) as SamplingParams keyword defaults; a key
    or value meshserve would not apply is an error rather than ignored."""
    out = {}
    for key, value in (overrides or {}).items():
        if key not in _FIELDS:
            raise InvalidArgumentError(f"override_generation_config: unknown key {key!r}; keys: "
                                       f"{', '.join(_FIELDS)}", param="override_generation_config")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise InvalidArgumentError(f"override_generation_config: {key} must be a number, got {value!r}",
                                       param="override_generation_config")
        out[_FIELDS[key]] = value
    return out
