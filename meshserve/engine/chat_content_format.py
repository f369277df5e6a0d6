"""--chat-template-content-format (vLLM's): how a message's content reaches the chat template.

string: one string (text parts joined by newlines), what most templates expect. openai: a list of
{"type": "text", "text": ...} parts, one per part the request gave (a string content is one part), for templates
that loop over the content. auto: openai when the template loops over a message's content, else string (vLLM
decides the same way, from the template's source).
"""

from __future__ import annotations

import re
from typing import Any

# `{% for part in message['content'] %}` / `message.content` / `msg["content"]`
_LOOPS_OVER_CONTENT = re.compile(r"for\s+\w+\s+in\s+\w+\s*(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")


def resolve_content_format(configured: str, template: Any) -> str:
    """string or openai, for the template that renders (its Jinja source; a dict of named templates too)."""
    if configured != "auto":
        return configured
    sources = template.values() if isinstance(template, dict) else [template or ""]
    return "openai" if any(_LOOPS_OVER_CONTENT.search(str(s)) for s in sources) else "string"


def with_content_format(messages: list[dict[str, Any]], content_format: str) -> list[dict[str, Any]]:
    """messages (content a string, a list of text parts, or None: template_messages' form) as vLLM hands them to
    the template (chat_utils._parse_chat_message_content). string: the parts joined by newlines, no content "".
    openai: the parts kept apart, a string as one text part, no content []; a tool message's text parts are
    joined into one string even so (vLLM's rule: most templates read a tool result as a string)."""
    return [_formatted(m, content_format) if isinstance(m, dict) else m for m in messages]


def _formatted(message: dict[str, Any], content_format: str) -> dict[str, Any]:
    content = message.get("content")
    if content_format != "openai":
        if content is None:
            content = ""
        elif isinstance(content, list):
            content = "\n".join(_text(p) for p in content)
        return {**message, "content": content}
    if content is None:
        content = []
    elif isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if message.get("role") == "tool" and isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" for p in content):
        content = "\n".join(p.get("text", "") for p in content)
    return {**message, "content": content}


def _text(part: Any) -> str:
    return part if isinstance(part, str) else str(part.get("text", "")) if isinstance(part, dict) else str(part)
