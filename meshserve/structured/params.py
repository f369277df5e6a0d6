"""StructuredOutputsParams: the constraint one request's output must follow (vLLM's names)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from meshserve.errors import InvalidArgumentError


@dataclass
class StructuredOutputsParams:
    """Exactly one of: a JSON schema (`json`, a dict or its JSON text), any JSON object (`json_object`),
    a regular expression, a list of choices, an EBNF grammar (xgrammar's GBNF dialect), or a structural tag
    (free text in which tagged parts follow their schemas)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict | None = None  # xgrammar's structural tag (vLLM's field), or its older form
    # a reasoning model's end-of-thinking token: the grammar holds only after it appears in the output (the
    # model thinks freely first, as in vLLM); None: from the first token. Not part of the grammar (key).
    reasoning_end_token_id: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):  # one text per schema: the compile cache keys on it
            self.json = json.dumps(self.json, separators=(",", ":"))  # key order kept: it is the output's
        if isinstance(self.structural_tag, dict):
            self.structural_tag = json.dumps(self.structural_tag, separators=(",", ":"))
        if self.json_object is False:  # vLLM's rule: an explicit false is a mistake, not "no constraint"
            raise InvalidArgumentError("json_object must be true if set; omit structured outputs for free text",
                                       param="structured_outputs")
        if isinstance(self.json, str) and not self.json.strip():
            raise InvalidArgumentError("the JSON schema cannot be an empty string", param="structured_outputs")
        given = [k for k in ("json", "regex", "choice", "grammar", "structural_tag") if getattr(self, k) is not None]
        if self.json_object:
            given.append("json_object")
        if len(given) != 1:
            raise InvalidArgumentError(
                "structured outputs need exactly one of json, json_object, regex, choice, grammar, structural_tag; "
                f"got {given or 'none'}", param="structured_outputs")
        if self.reasoning_end_token_id is not None and (isinstance(self.reasoning_end_token_id, bool)
                                                        or not isinstance(self.reasoning_end_token_id, int)
                                                        or self.reasoning_end_token_id < 0):
            raise InvalidArgumentError("reasoning_end_token_id must be a token id", param="structured_outputs")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) for c in self.choice)):
            raise InvalidArgumentError("choice must be a non-empty list of strings", param="structured_outputs")

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec): what identifies the compiled grammar."""
        if self.json is not None:
            return "json", self.json  # type: ignore[return-value]
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.grammar is not None:
            return "grammar", self.grammar
        if self.structural_tag is not None:
            return "structural_tag", self.structural_tag
        return "json_object", ""
