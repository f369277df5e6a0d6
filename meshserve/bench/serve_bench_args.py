"""`meshserve bench serve`'s flags, checked before the first request: a bad rate, a missing prompts file or a
report path in a missing folder fails at once with one line naming the flag, not after the server has been
loaded for minutes (or as an httpx traceback when no server listens)."""

from __future__ import annotations

import argparse
import math
from urllib.parse import urlsplit

from meshserve.cli_paths import check_input_file, check_output_file
from meshserve.errors import InvalidArgumentError, MeshserveError


class ServerUnreachableError(MeshserveError):
    """The benchmark's server did not answer (nothing listening, a name that does not resolve, a timeout)."""


def _numbers(text: str, flag: str, cast: type) -> list:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InvalidArgumentError(f"{flag} {text!r}: expected comma-separated numbers", param=flag) from None
    if not values:
        raise InvalidArgumentError(f"{flag} {text!r}: no value given", param=flag)
    if cast is int and any(not math.isfinite(v) or v != int(v) or v < 1 for v in values):
        raise InvalidArgumentError(f"{flag} {text!r}: each value must be a whole number >= 1", param=flag)
    if cast is float and any(math.isnan(v) or v <= 0 for v in values):
        raise InvalidArgumentError(f"{flag} {text!r}: each rate must be > 0 (inf: all at once)", param=flag)
    return [cast(v) for v in values]


def check_base_url(url: str) -> None:
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018  (raises ValueError for a port out of range)
    except ValueError as e:
        raise InvalidArgumentError(f"--base-url {url!r}: {e}", param="base_url") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgumentError(f"--base-url {url!r}: expected http(s)://HOST[:PORT]", param="base_url")


def loads_and_counts(ns: argparse.Namespace) -> tuple[list[tuple[str, float]], list[int | None]]:
    """The load points ((kind, load) each) and the prompt count of each (or [None]: W3's default)."""
    if ns.concurrency:
        loads = [("concurrency", c) for c in _numbers(ns.concurrency, "--concurrency", int)]
    else:
        loads = [("qps", q) for q in _numbers(ns.qps, "--qps", float)]
    counts = _numbers(ns.num_prompts, "--num-prompts", int) if ns.num_prompts else [None]
    if len(counts) not in (1, len(loads)):
        raise InvalidArgumentError(f"--num-prompts gives {len(counts)} counts for {len(loads)} points",
                                   param="num_prompts")
    return loads, counts


def check_serve_bench_args(ns: argparse.Namespace) -> None:
    """Every flag that can be judged without the server; raises InvalidArgumentError."""
    check_base_url(ns.base_url)
    if ns.dataset == "file" and not ns.dataset_path:
        raise InvalidArgumentError("--dataset file needs --dataset-path", param="dataset_path")
    if ns.endpoint == "chat" and ns.dataset != "file" and ns.workload == "w3":
        raise InvalidArgumentError("--endpoint chat needs text prompts: add --dataset file --dataset-path FILE",
                                   param="endpoint")
    if ns.dataset == "file":
        check_input_file(ns.dataset_path, "--prompts-file" if ns.prompts_file else "--dataset-path")
    for flag in ("--response-format-json-schema", "--score-json-schema"):
        check_input_file(getattr(ns, flag[2:].replace("-", "_")), flag)
    for flag, value, least in (("--input-len", ns.input_len, 1), ("--output-len", ns.output_len, 1),
                               ("--max-token-id", ns.max_token_id, 3)):
        if value < least:
            raise InvalidArgumentError(f"{flag} must be >= {least}, got {value}", param=flag[2:])
    if not ns.temperature >= 0:  # NaN too
        raise InvalidArgumentError(f"--temperature must be >= 0, got {ns.temperature}", param="temperature")
    for flag, value in (("--ttft-slo", ns.ttft_slo), ("--tpot-slo", ns.tpot_slo)):
        if not value > 0:
            raise InvalidArgumentError(f"{flag} must be > 0 seconds, got {value}", param=flag[2:])
    for flag in ("--output-json", "--benchmarks-md", "--plot"):
        check_output_file(getattr(ns, flag[2:].replace("-", "_")), flag)


def unreachable(base_url: str, error: Exception) -> ServerUnreachableError:
    """One line for an httpx transport error of a request to base_url: what failed and what to do."""
    import httpx

    if isinstance(error, httpx.TimeoutException):
        why = "timed out"
    elif isinstance(error, httpx.ConnectError) and "refused" in str(error).lower():
        why = "connection refused"
    else:
        why = str(error) or type(error).__name__
    return ServerUnreachableError(f"cannot reach the server at {base_url} ({why}); start one with "
                                  "`meshserve serve` or pass --base-url")
