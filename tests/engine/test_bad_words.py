"""Bad words: tokenized in each spelling vLLM bans, and the last token banned only after the rest of the word."""

from __future__ import annotations

from meshserve.engine.bad_words import banned_by_bad_words, tokenize_bad_words


class _CharTokenizer:
    """One token per character (id = code point), except " cat" which is one token (id 1000)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        assert not add_special_tokens
        if text.startswith(" cat"):
            return [1000] + [ord(c) for c in text[4:]]
        return [ord(c) for c in text]


def test_words_are_tokenized_plain_and_after_a_space():
    tok = _CharTokenizer()
    # " cat": the spaced spelling is another first token of another length ([1000] vs [c, a, t]): not kept
    assert tokenize_bad_words(tok, ["cat"]) == [[ord("c"), ord("a"), ord("t")]]
    # "x": " x" is two tokens, not one: vLLM keeps only a spaced spelling of the same length
    assert tokenize_bad_words(tok, ["x"]) == [[ord("x")]]
    # leading spaces are stripped before both spellings
    assert tokenize_bad_words(tok, ["  ab"]) == [[ord("a"), ord("b")]]


def test_spaced_spelling_of_the_same_length_is_banned_too():
    class Bpe:
        def encode(self, text, add_special_tokens=False):
            return {"hello": [5, 6], " hello": [9, 6]}[text]

    assert tokenize_bad_words(Bpe(), ["hello"]) == [[5, 6], [9, 6]]


def test_last_token_banned_only_after_the_prefix():
    words = [[7], [3, 4], [1, 2, 5]]
    assert banned_by_bad_words(words, []) == [7]  # [3, 4] cannot complete yet: 4 would need 3 first
    assert banned_by_bad_words(words, [9, 3]) == [7, 4]
    assert banned_by_bad_words(words, [3, 9]) == [7]
    assert banned_by_bad_words(words, [1, 2]) == [7, 5]
    assert banned_by_bad_words(words, [2]) == [7]  # only part of the prefix
    assert banned_by_bad_words([], [1, 2]) == []
