"""The front end's tokenizer, loaded through the class AutoTokenizer would pick, without importing it.

`transformers.models.auto.tokenization_auto` reaches transformers' configuration code and through it torch:
~4-6 s on a small CPU, the largest part of the API process's start-up, though the tokenizer classes themselves
(tokenization_utils_tokenizers, a model's tokenization_*.py) import neither. For a local folder whose
tokenizer_config.json names its class and whose config.json's model_type is one meshserve serves (or which has no
config.json: a tokenizer alone), `direct_class` follows AutoTokenizer.from_pretrained's choice
step by step on the same two files (transformers 5.24 and later 5.x: VERIFIED_FROM), with transformers' tables copied for those model types; that class's
from_pretrained then gets AutoTokenizer's kwargs. Anything else (remote code, a model type or class name not below, Mistral's tekken
probe, a missing or broken file, MESHSERVE_TOKENIZER_LOADER=auto) returns None: AutoTokenizer loads it.
tests/models/test_direct_tokenizer.py holds the tables and the loaded tokenizers to transformers' own.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import os

from meshserve.models.hf_config import transformers_version

_SWITCH = "MESHSERVE_TOKENIZER_LOADER"  # "auto": always transformers' AutoTokenizer
# the transformers releases whose tables and loading steps this module follows (checked by the tests against the
# installed one); older 5.x differ inside (5.17, the GPU image's, has no resolve_revision and no byte-level probe
# on TokenizersBackend), so they take AutoTokenizer
VERIFIED_FROM = (5, 24)
VERIFIED_BEFORE = (6, 0)

# tokenization_auto.TOKENIZER_MAPPING_NAMES for the model types meshserve serves (None: no entry). The Mistral
# types are left out: theirs depends on mistral_common being installed and on a tekken.json probe.
REGISTERED_CLASS = {"llama": None, "qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                    "qwen2_moe": "Qwen2Tokenizer", "qwen3_moe": "Qwen2Tokenizer", "deepseek_v2": None,
                    "deepseek_v3": None}
# of these, the ones in tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
INCORRECT_HUB_CLASS = {"qwen2"}
# tokenization_auto.MODEL_IDS_TO_TOKENIZERS_BACKEND: checkpoints forced onto TokenizersBackend by name
TOKENIZERS_BACKEND_IDS = ("deepseek-ai/deepseek-r1-distill-llama-*", "deepseek-ai/deepseek-coder-*",
                          "allenai/dolma2-tokenizer", "google/umt5-small", "naver-clova-ix/donut-*",
                          "salesforce/blip2-opt-*", "salesforce/blip2-flan-t5-*",
                          "salesforce/instructblip-flan-t5-*", "stepfun-ai/step-3.7-*")
# tokenization_auto.tokenizer_class_from_name(name) -> (module, attribute), for the names handled here
_BACKEND = ("transformers.tokenization_utils_tokenizers", "TokenizersBackend")
_PYTHON = ("transformers.tokenization_python", "PythonBackend")
CLASS_BY_NAME = {
    "TokenizersBackend": _BACKEND, "PreTrainedTokenizerFast": _BACKEND,
    "PythonBackend": _PYTHON, "PreTrainedTokenizer": _PYTHON,
    "Qwen2Tokenizer": ("transformers.models.qwen2.tokenization_qwen2", "Qwen2Tokenizer"),
    "Qwen2TokenizerFast": ("transformers.models.qwen2.tokenization_qwen2", "Qwen2Tokenizer"),
    "LlamaTokenizer": ("transformers.models.llama.tokenization_llama", "LlamaTokenizer"),
    "LlamaTokenizerFast": ("transformers.models.llama.tokenization_llama", "LlamaTokenizer"),
    "GPT2Tokenizer": ("transformers.models.gpt2.tokenization_gpt2", "GPT2Tokenizer"),
    "GPT2TokenizerFast": ("transformers.models.gpt2.tokenization_gpt2", "GPT2Tokenizer"),
}
_GENERIC = ("TokenizersBackend", "PythonBackend", "PreTrainedTokenizerFast")
# AutoTokenizer's kwargs that reach the class unchanged (others, e.g. gguf_file, trust_remote_code, steer it)
_PLAIN_KWARGS = {"local_files_only", "revision", "cache_dir", "token", "_from_auto", "_commit_hash"}


class _NeedsAuto(Exception):
    """A step of AutoTokenizer's choice this module does not reproduce."""


def _class_from_name(name: str):
    if name not in CLASS_BY_NAME:
        raise _NeedsAuto(name)
    module, attr = CLASS_BY_NAME[name]
    return getattr(importlib.import_module(module), attr)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise _NeedsAuto(path) from e
    if not isinstance(out, dict):
        raise _NeedsAuto(path)
    return out


def _choose(path: str, kwargs: dict):
    """AutoTokenizer.from_pretrained's class for the local folder `path`, its steps in its order."""
    config_path = os.path.join(path, "config.json")
    # a tokenizer alone (no config.json, e.g. --tokenizer DIR): AutoConfig refuses the folder and AutoTokenizer
    # goes on with a bare PreTrainedConfig, whose model type is "" (no registered class) and name ""
    alone = not os.path.lexists(config_path)
    config = {} if alone else _read_json(config_path)
    tokenizer_config = _read_json(os.path.join(path, "tokenizer_config.json"))
    model_type = "" if alone else config.get("model_type")
    hub_class = tokenizer_config.get("tokenizer_class")
    kwargs["_commit_hash"] = tokenizer_config.get("_commit_hash", kwargs.get("_commit_hash"))
    if ("auto_map" in tokenizer_config or (not alone and model_type not in REGISTERED_CLASS)
            or not isinstance(hub_class, str)):
        raise _NeedsAuto(path)  # remote code, another model type, or the class taken from the config
    names = [str(n).lower() for n in (path, config.get("_name_or_path"), config.get("name_or_path")) if n]
    if any(fnmatch.fnmatch(n, p) for n in names for p in TOKENIZERS_BACKEND_IDS):
        raise _NeedsAuto(path)
    registered = REGISTERED_CLASS.get(model_type)
    incorrect = model_type in INCORRECT_HUB_CLASS or config.get("model_name") in INCORRECT_HUB_CLASS
    backend = _class_from_name("TokenizersBackend")

    # a Llama-declared tokenizer.json that is ByteLevel (Llama 3 style) gets TokenizersBackend
    if (hub_class.removesuffix("Fast") == "LlamaTokenizer" and not incorrect
            and backend._tokenizer_json_has_byte_level(path, **kwargs)):
        return backend
    # the model type registers another class than the hub's (not reproduced: AutoTokenizer skips this step
    # where AutoConfig refuses config.json, its model type then "")
    if registered is not None and registered.removesuffix("Fast") != hub_class.removesuffix("Fast"):
        if registered.removesuffix("Fast") not in (*_GENERIC, "MistralCommonBackend"):
            cls = _class_from_name(registered.removesuffix("Fast") if incorrect else hub_class)
            if cls.__name__ not in _GENERIC:
                return cls
        return backend
    # the hub's class, by its name without "Fast" (or with it)
    name = hub_class.removesuffix("Fast")
    try:
        cls = _class_from_name(name)
    except _NeedsAuto:
        cls = _class_from_name(name + "Fast")
    return backend if cls.__name__ == "PythonBackend" else cls


def _verified(version: str | None) -> bool:
    """Whether `version` (transformers') lies in [VERIFIED_FROM, VERIFIED_BEFORE)."""
    try:
        major_minor = tuple(int(part) for part in (version or "").split(".")[:2])
    except ValueError:
        return False
    return VERIFIED_FROM <= major_minor < VERIFIED_BEFORE


def direct_class(path: str, kwargs: dict):
    """The class AutoTokenizer.from_pretrained(path, **kwargs) would instantiate, or None where this module
    does not follow its choice. `kwargs`: those AutoTokenizer passes on (see `load`); sets _commit_hash."""
    if (os.environ.get(_SWITCH, "").lower() == "auto" or not _verified(transformers_version())
            or not os.path.isdir(path) or not set(kwargs) <= _PLAIN_KWARGS):
        return None
    try:
        return _choose(path, kwargs)
    except _NeedsAuto:
        return None


def load(path: str, **kwargs):
    """AutoTokenizer.from_pretrained(path, **kwargs)'s tokenizer, through its class directly where known."""
    if not _verified(transformers_version()):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kwargs)
    from transformers.utils.hub import resolve_revision

    passed = {**kwargs, "_from_auto": True}
    passed["revision"] = resolve_revision(path, passed.get("revision"), token=passed.get("token"),
                                          local_files_only=passed.get("local_files_only", False),
                                          cache_dir=passed.get("cache_dir"))
    cls = direct_class(path, passed)
    if cls is None:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path, **kwargs)
    return cls.from_pretrained(path, **passed)
