"""vLLM's spellings of a command line, rewritten to meshserve's before argparse sees them.

vLLM's parser (FlexibleArgumentParser) takes `--max_model_len` for `--max-model-len` (underscores in a flag's name,
not in its value), and builds a JSON flag from dotted keys: `--compilation-config.mode 3` or `-cc.mode=3` is
`--compilation-config '{"mode": 3}'`, several dotted keys of one flag merge into one object, and a key ending in `+`
takes a comma-separated list (`--x.sizes+ 1,2` is `{"sizes": ["1", "2"]}`). A `vllm serve` command line using either
form parses here too; everything else passes through unchanged (values are never rewritten).
"""

from __future__ import annotations

import json
import re

# a flag name with a dotted key: --name.key[.key...][+] or -short.key (not a negative number such as -0.5)
_DOTTED = re.compile(r"^(--?[A-Za-z][\w-]*)((?:\.[\w-]+)+)(\+?)$")


def _dashes(flag: str) -> str:
    """--a_b.c_d -> --a-b.c_d: underscores become dashes in the flag's name, up to its first dot."""
    name, dot, keys = flag.partition(".")
    return "--" + name[2:].replace("_", "-") + dot + keys


def _json_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word: a string, as vLLM reads it


def _merge(into: dict, keys: list[str], value) -> None:
    for key in keys[:-1]:
        if not isinstance(into.get(key), dict):
            into[key] = {}
        into = into[key]
    if isinstance(value, list) and isinstance(into.get(keys[-1]), list):
        into[keys[-1]] += value
    else:
        into[keys[-1]] = value


def normalize_argv(argv: list[str]) -> list[str]:
    """argv with vLLM's underscore and dotted-key spellings in meshserve's (see the module's docstring)."""
    out: list[str] = []
    dotted: dict[str, dict] = {}  # flag -> the object its dotted keys build, in first-seen order
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":  # what follows is not flags
            out += argv[i - 1:]
            break
        flag, eq, value = arg.partition("=") if arg.startswith("-") else (arg, "", "")
        if flag.startswith("--"):
            flag = _dashes(flag)
        match = _DOTTED.match(flag) if flag.startswith("-") else None
        if match is None:
            out.append(flag + eq + value if eq else flag)
            continue
        name, keys, plus = match.group(1), match.group(2)[1:].split("."), match.group(3)
        if not eq:
            if i >= len(argv):  # no value: argparse says what is missing
                out.append(flag)
                continue
            value = argv[i]
            i += 1
        parsed = [v for v in value.split(",")] if plus else _json_value(value)
        _merge(dotted.setdefault(name, {}), keys, parsed)
    for name, obj in dotted.items():
        out += [name, json.dumps(obj)]
    return out
