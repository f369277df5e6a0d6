"""`meshserve serve --config FILE` (vLLM's): flags from a YAML file of `flag-name: value`, e.g.

    model: /models/Qwen3-8B
    port: 8001
    tensor-parallel-size: 2
    enable-prefix-caching: true
    allowed-origins: ["https://app.example"]

Flags on the command line win over the file, as in vLLM. A key is a flag's long name (dashes or underscores);
true turns a switch on, false a --no- switch off; a list fills a many-valued flag, and a list or mapping
given to a JSON flag is passed as JSON."""

from __future__ import annotations

import argparse
import json
from typing import Any

from meshserve.errors import InvalidArgumentError


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        import yaml
    except ImportError:
        raise InvalidArgumentError("--config needs PyYAML (pip install pyyaml)", param="config") from None
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise InvalidArgumentError(f"--config: cannot read {path!r}: {e.strerror}", param="config") from None
    except UnicodeDecodeError as e:  # a binary file: it was a traceback
        raise InvalidArgumentError(f"--config: {path!r} is not UTF-8 text ({e.reason})", param="config") from None
    except yaml.YAMLError as e:
        raise InvalidArgumentError(f"--config: {path!r} is not valid YAML ({str(e).splitlines()[0]})",
                                   param="config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"--config: {path!r} must hold a mapping of flag names to values", param="config")
    return data


def config_file_argv(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The command-line flags the file stands for."""
    options = parser._option_string_actions
    argv: list[str] = []
    for key, value in _read_yaml(path).items():
        flag = "--" + str(key).replace("_", "-")
        action = options.get(flag)
        if action is None:
            raise InvalidArgumentError(f"--config: {path!r} names {key!r}, which is no `meshserve serve` flag",
                                       param="config")
        if flag == "--config":
            raise InvalidArgumentError("--config: a config file cannot name another", param="config")
        if isinstance(value, bool):
            if value:
                argv.append(flag)
            elif isinstance(action, argparse.BooleanOptionalAction):
                argv.append("--no-" + flag[2:])
        elif isinstance(value, list) and action.nargs in ("+", "*"):
            argv += [flag, *map(str, value)]
        elif isinstance(value, (list, dict)):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def merge_config_file(ns: argparse.Namespace, parser: argparse.ArgumentParser, path: str,
                      argv: list[str] | None = None) -> None:
    """Set on ns what the file sets, except where the command line gave a flag. argv (the whole command line,
    `serve` (or `run-batch`) and the flags after it, as main() records it): the file's flags are parsed first
    and the command line's over them, as vLLM does, so a flag given its default value (`--port 8000`) still
    wins. Without argv, a flag counts as given when its value is not the default."""
    from_file = parser.parse_args(config_file_argv(parser, path))
    command = getattr(ns, "command", None) or "serve"  # `run-batch --config FILE` too
    given = argv[argv.index(command) + 1:] if argv and command in argv else None
    if given is not None:  # argparse sets no default where the namespace holds a value: the rest is the file's
        parser.parse_args(given, namespace=from_file)
    for action in parser._actions:
        dest = action.dest
        if dest in ("help", "config_file") or not hasattr(from_file, dest):
            continue
        if dest == "model" and getattr(ns, "model_tag", None):  # `serve MODEL` on the command line wins
            continue
        value = getattr(from_file, dest)
        if given is not None or value != action.default and getattr(ns, dest, action.default) == action.default:
            setattr(ns, dest, value)
