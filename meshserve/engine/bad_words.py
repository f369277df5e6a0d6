"""Bad words (vLLM's `bad_words`): strings whose token sequences a request must not generate.

The front end tokenizes each word (it holds the tokenizer); the sampler bans, at each step, the last token of
every word whose other tokens end the output so far. A word is banned as written (leading spaces stripped) and,
where the tokenizer spells it differently after a space, in that spelling too: vLLM's rule, which keeps the
spaced spelling only when it has as many tokens as the plain one and starts with another token.
"""

from __future__ import annotations

from typing import Any


def tokenize_bad_words(tokenizer: Any, words: list[str]) -> list[list[int]]:
    """Each word's token ids, once as written and once after a space (when that spelling differs)."""
    sequences: list[list[int]] = []
    for word in words:
        plain = list(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        spaced = list(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if plain:
            sequences.append(plain)
        if spaced and (not plain or (len(spaced) == len(plain) and spaced[0] != plain[0])):
            sequences.append(spaced)
    return sequences


def banned_by_bad_words(words: list[list[int]], output_token_ids: list[int] | None) -> list[int]:
    """The ids the next token may not be: each word's last token where the output ends with the rest of it
    (a one-token word is always banned). A word longer than the output plus one token cannot complete yet."""
    if not words:
        return []
    output = output_token_ids or []
    banned = []
    for word in words:
        prefix = len(word) - 1
        if prefix > len(output):
            continue
        if prefix == 0 or output[-prefix:] == word[:-1]:
            banned.append(word[-1])
    return banned
