"""A transformers config's fields as plain attributes, for the processes a driver spawns (worker ranks).

Unpickling a transformers config object imports transformers (its package index and the family's
configuration module): 1.5-2 s of a quiet core per spawned rank, ~4 s of a loaded one, on the start-up's
critical path, though a rank only reads the config's fields. The snapshot holds those fields' values (the
class's defaults, properties and `attribute_map` aliases included), pickles without transformers, and
keeps `to_dict` / `to_json_string(use_diff=False)` as they were; code that calls transformers with the
config (scaled RoPE) restores the object first (as_hf_config).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import logging
import warnings
from typing import Any


def _is_hf_config(value: Any) -> bool:
    # PreTrainedConfig (transformers 5; PretrainedConfig before), matched by name: transformers not imported
    return any(c.__name__.lower() == "pretrainedconfig" and c.__module__.startswith("transformers")
               for c in type(value).__mro__)


def _from_transformers(value: Any) -> bool:
    """A class or object whose pickle names a transformers module (unpickling it imports transformers)."""
    kind = value if isinstance(value, type) else type(value)
    return (getattr(kind, "__module__", "") or "").startswith("transformers")


def _plain(value: Any):
    """value with each transformers config in it snapshot; None where it needs transformers to unpickle."""
    if _is_hf_config(value):
        return ConfigSnapshot(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if _from_transformers(value):
        return None
    return value


@contextlib.contextmanager
def _quiet():
    log = logging.getLogger("transformers")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        log.setLevel(level)


class ConfigSnapshot:
    """A transformers config's fields, read as attributes; a missing one raises AttributeError, as there."""

    def __init__(self, hf_config):
        names = {n for n in dir(hf_config) if not n.startswith("__")}
        names |= set(getattr(hf_config, "attribute_map", {}) or {})  # aliases: not in dir()
        for name in sorted(names):
            try:
                with _quiet():  # deprecated aliases (torch_dtype, use_return_dict) warn when read
                    value = getattr(hf_config, name)
            except Exception:  # noqa: BLE001  (a property that does not apply to this config)
                continue
            if callable(value) or _from_transformers(value) and not _is_hf_config(value):
                continue  # methods, and classes or views (per_layer_config) that would import transformers
            self.__dict__[name] = _plain(value)
        self.__dict__["_snapshot_of"] = type(hf_config).__name__
        self.__dict__["_class_module"] = type(hf_config).__module__
        self.__dict__["_as_dict"] = _plain(hf_config.to_dict())
        self.__dict__["_as_json"] = hf_config.to_json_string(use_diff=False)

    def to_dict(self) -> dict:
        return copy.deepcopy(self._as_dict)

    def to_json_string(self, use_diff: bool = True) -> str:
        if use_diff:
            raise NotImplementedError("a config snapshot keeps the full JSON only (use_diff=False)")
        return self._as_json

    def restore(self):
        """The transformers config again (imports transformers), for code that calls its methods."""
        module = importlib.import_module(self._class_module)
        return getattr(module, self._snapshot_of).from_dict(self.to_dict())

    def __repr__(self) -> str:
        return f"ConfigSnapshot({self._snapshot_of})"


def as_hf_config(config):
    """config itself, or the transformers config a snapshot was taken of or a PlainHFConfig equals."""
    from meshserve.models.hf_config import as_transformers_config

    return config.restore() if isinstance(config, ConfigSnapshot) else as_transformers_config(config)


def without_transformers(obj):
    """obj (a dataclass tree, e.g. EngineConfig or ModelSource) with every transformers config in it replaced
    by its ConfigSnapshot; obj itself when there is none."""
    if _is_hf_config(obj):
        return ConfigSnapshot(obj)
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        return obj
    changed = {}
    for f in dataclasses.fields(obj):
        if not f.init:
            continue
        value = getattr(obj, f.name)
        new = without_transformers(value)
        if new is not value:
            changed[f.name] = new
    return dataclasses.replace(obj, **changed) if changed else obj
