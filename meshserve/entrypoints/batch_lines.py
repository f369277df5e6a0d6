"""OpenAI's Batch API file format: the input lines `run-batch` reads and the output lines it writes.

Input, one JSON object a line: {"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}.
Output, one a request: {"id": "batch_req_...", "custom_id", "response": {"status_code", "request_id", "body"},
"error": null}, or for a line that never reached an endpoint "response": null and "error": {"code", "message"}.
A bad line is reported on its own output line: the rest of the batch still runs.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

# the generation routes the server answers with JSON (its app: meshserve/serve/openai_api.py)
BATCH_URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass(frozen=True)
class BatchRequest:
    """One well-formed input line: its body goes to its url."""

    custom_id: str
    url: str
    body: dict[str, Any]


@dataclass(frozen=True)
class BatchLineError:
    """One input line that is not a request meshserve can run; custom_id when the line had one."""

    custom_id: str | None
    code: str
    message: str


def parse_batch_lines(lines: Iterable[str]) -> list[BatchRequest | BatchLineError]:
    """Each non-blank line's request, or why it is none; a custom_id seen before is refused (the first runs)."""
    seen: set[str] = set()
    parsed: list[BatchRequest | BatchLineError] = []
    for number, line in enumerate(lines, start=1):
        if line.strip():
            parsed.append(_parse_line(line, number, seen))
    return parsed


def _parse_line(line: str, number: int, seen: set[str]) -> BatchRequest | BatchLineError:
    try:
        item = json.loads(line)
    except (ValueError, RecursionError) as e:
        return BatchLineError(None, "invalid_json_line", f"line {number} is not valid JSON ({e})")
    if not isinstance(item, dict):
        return BatchLineError(None, "invalid_json_line", f"line {number} is not a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchLineError(None, "missing_custom_id", f"line {number}: custom_id must be a non-empty string")
    if custom_id in seen:
        return BatchLineError(custom_id, "duplicate_custom_id",
                              f"line {number}: custom_id {custom_id!r} is used by an earlier line")
    seen.add(custom_id)
    if item.get("method") != "POST":
        return BatchLineError(custom_id, "invalid_method", f"line {number}: method must be \"POST\", "
                                                           f"got {item.get('method')!r}")
    url = item.get("url")
    if url not in BATCH_URLS:
        return BatchLineError(custom_id, "invalid_url", f"line {number}: url {url!r} is not served; choose from "
                                                        f"{', '.join(BATCH_URLS)}")
    body = item.get("body")
    if not isinstance(body, dict):
        return BatchLineError(custom_id, "missing_body", f"line {number}: body must be a JSON object")
    if body.get("stream") is True:  # a batch writes one answer a request, never a stream of events
        return BatchLineError(custom_id, "stream_not_supported",
                              f"line {number}: \"stream\": true is not supported in a batch")
    return BatchRequest(custom_id, url, body)


def response_line(custom_id: str, status_code: int, body: Any) -> dict[str, Any]:
    """The output line of a request an endpoint answered: its status and JSON, a refusal's error body too."""
    return {"id": _new_id("batch_req"), "custom_id": custom_id,
            "response": {"status_code": status_code, "request_id": _new_id("req"), "body": body}, "error": None}


def error_line(custom_id: str | None, code: str, message: str) -> dict[str, Any]:
    """The output line of a request that reached no endpoint."""
    return {"id": _new_id("batch_req"), "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"
