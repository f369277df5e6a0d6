"""vLLM's spellings of flag values, so its command lines parse here too: `--max-model-len 32k` (human-readable
integers: k/m/g/t powers of 1000, K/M/G/T powers of 1024, decimals with the former only) and
`--dtype half` / `float` (its aliases of float16 / float32)."""

from __future__ import annotations

import argparse
import re

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_DTYPE_ALIASES = {"half": "float16", "float": "float32"}
# vLLM's engine arguments that ask for what meshserve does anyway: taken and logged as no-ops (`serve` flags and
# LLM(...) keywords alike), with why
NO_OP_ARGS = {"trust_remote_code": "meshserve never runs a model's own code (it implements the architectures)",
              "disable_log_stats": "meshserve logs no periodic statistics (see /metrics)"}


def human_int(text: str) -> int:
    """'32k' -> 32000, '32K' -> 32768, '25.6k' -> 25600, '4096' -> 4096."""
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgtKMGT])", value)
    if match:
        number, suffix = match.groups()
        if suffix in _DECIMAL:
            return int(float(number) * _DECIMAL[suffix])
        if "." in number:
            raise argparse.ArgumentTypeError(f"{text!r}: no decimals with the binary suffix {suffix} "
                                             f"(did you mean {number}{suffix.lower()}?)")
        return int(number) * _BINARY[suffix]
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer such as 4096, 32k or 32K, got {text!r}") from None


def dtype_name(text: str) -> str:
    """vLLM's dtype aliases to the names meshserve uses (the choices check what remains)."""
    return _DTYPE_ALIASES.get(text, text)
