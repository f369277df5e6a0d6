"""`meshserve simulate --config FILE`: the flags that do not fit a command line, from a TOML or JSON file.

The file's keys are the command's flag names without the leading dashes (`num-gpus` or `num_gpus`); its values
are applied where `--config` stands on the command line, as if typed there, so flags after it win (put it first).
Each value goes through its flag's own type and choices, so a file can say nothing a command line could not.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from meshserve.cli_paths import read_text_file
from meshserve.errors import InvalidArgumentError


def _load(path: Path) -> dict[str, Any]:
    text = read_text_file(str(path), "--config", "config")
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise InvalidArgumentError(f"--config {path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                                   f"({e})", param="config") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"--config {path}: expected a table of flag = value", param="config")
    return data


def _value(action: argparse.Action, key: str, raw: Any, parser: argparse.ArgumentParser) -> Any:
    """raw as the flag would have parsed it: store_true/false flags take a boolean, others their type."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(raw, bool):
            raise InvalidArgumentError(f"--config: {key} takes true or false, got {raw!r}", param="config")
        return raw if isinstance(action, argparse._StoreTrueAction) else not raw
    if isinstance(action, argparse._AppendAction):  # a repeatable flag (--fail-replica): a list, or one value
        return [_value(argparse.Action(action.option_strings, action.dest, type=action.type), key, x, parser)
                for x in (raw if isinstance(raw, list) else [raw])]
    if isinstance(raw, list):  # a list for a comma-separated flag (--pp-layer-partition, --search-gpus)
        raw = ",".join(str(x) for x in raw)
    if raw is None or isinstance(raw, (dict, bool)):
        raise InvalidArgumentError(f"--config: {key} = {raw!r} is not a value for --{key}", param="config")
    try:
        value = parser._get_value(action, str(raw))  # the flag's own type conversion
    except argparse.ArgumentError as e:
        raise InvalidArgumentError(f"--config: {key}: {e.message}", param="config") from None
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise InvalidArgumentError(f"--config: {key} must be one of {choices}, got {value!r}", param="config")
    return value


class ConfigFileAction(argparse.Action):
    """Sets the namespace from a TOML/JSON file of the parser's own flags, at the flag's place in the line."""

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            self._apply(parser, namespace, Path(values))
        except InvalidArgumentError as e:  # a usage error, as argparse reports one (exit status 2)
            parser.error(str(e))
        setattr(namespace, self.dest, values)

    def _apply(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, path: Path) -> None:
        by_name = {opt.lstrip("-"): a for a in parser._actions for opt in a.option_strings
                   if opt.startswith("--") and a.dest not in ("help", self.dest)}
        for key, raw in _load(path).items():
            action = by_name.get(key.replace("_", "-"))
            if action is None:
                raise InvalidArgumentError(f"--config: unknown flag {key!r} (keys are the flags of `meshserve "
                                           "simulate` without the dashes)", param="config")
            setattr(namespace, action.dest, _value(action, key, raw, parser))
