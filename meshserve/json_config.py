"""Flags that take a JSON object (vLLM's --speculative-config, --kv-transfer-config): a dict or a JSON string,
its keys checked against a dataclass's fields; every mistake is one InvalidArgumentError line naming the flag
(and the key)."""

from __future__ import annotations

import json
from dataclasses import fields
from typing import Any

from meshserve.errors import InvalidArgumentError


def config_error(flag: str, msg: str, key: str | None = None) -> InvalidArgumentError:
    where = f"{flag}.{key}" if key else flag
    return InvalidArgumentError(f"{where}: {msg}", param=flag)


def config_object(value: Any, flag: str) -> dict:
    """value (a dict, or a JSON string of an object) as a dict."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise config_error(flag, f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise config_error(flag, f"must be a JSON object, got {type(value).__name__}")
    return value


def config_dict(value: Any, cls: type, flag: str) -> dict:
    """value (a dict, or a JSON string of an object) as a new dict whose keys are all fields of cls."""
    value = config_object(value, flag)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise config_error(flag, f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    return dict(value)
