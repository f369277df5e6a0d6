"""--chat-template-content-format (vLLM's): how a message's content reaches the chat template.

string: one string (text parts joined by newlines), what most templates expect. openai: a list of
{"type": "text", "text": ...} parts, for templates that loop over the content. auto: openai when the template
loops over a message's content, else string (vLLM decides the same way, from the template's source).
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
    """messages (content a string, template_messages' form) as the format wants them."""
    if content_format != "openai":
        return messages
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str)
            else m for m in messages]
