"""IncrementalDetokenizer: one sequence's output token ids to text, token by token, with stop strings.

Decoding is delegated to `tokenizers.decoders.DecodeStream`, which re-decodes only a small window of
recent ids per step and withholds text while it ends in an incomplete UTF-8 character. This class adds
what DecodeStream lacks: prompt context for the first token, a flush of bytes still held at the end,
recovery when a decoder breaks DecodeStream's prefix assumption, stop-string matching across token
boundaries, and a streaming view that never leaks the beginning of a stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from meshserve.sampling import SamplingParams

# Prompt tokens that seed the decode window: enough for context-dependent decoders (Metaspace drops the
# leading space of the first token it sees) without paying for a long re-decode on the first step.
_PROMPT_CONTEXT_TOKENS = 5
# Recently decoded ids kept for the rare paths that decode by hand (final flush, resync after an error).
_RECENT_TOKENS = 8
# DecodeStream re-decodes all the ids it holds back at every step, so a long run of them (special tokens the text
# skips, an EOS repeated under ignore_eos, bytes that never complete a character) would cost O(run) per token.
# Past this many held ids the run's text is let go but for its last _HELD_TAIL ids (a character may still end there).
_MAX_HELD_TOKENS = 8
_HELD_TAIL = 4
_REPLACEMENT_CHAR = "\ufffd"


def backend_tokenizer(tokenizer: Any) -> Tokenizer:
    """The `tokenizers.Tokenizer` behind a transformers fast tokenizer (or the tokenizer itself)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    for attr in ("backend_tokenizer", "_tokenizer"):
        backend = getattr(tokenizer, attr, None)
        if isinstance(backend, Tokenizer):
            return backend
    raise TypeError(f"{type(tokenizer).__name__} has no tokenizers.Tokenizer backend (need a fast tokenizer)")


class IncrementalDetokenizer:
    """Turns one sequence's output token ids into text as they arrive, and finds stop strings.

    The text equals `decode(prompt + output)` minus the decoded prompt, which is `decode(output)` for
    context-free decoders such as byte-level BPE (`skip_special_tokens` as in the params).
    `spaces_between_special_tokens` and `clean_up_tokenization_spaces` are not applied: fast
    tokenizers ignore the former, and transformers skips the latter for BPE models.
    """

    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], params: SamplingParams) -> None:
        self._tokenizer = backend_tokenizer(tokenizer)
        self._skip_special = params.skip_special_tokens
        self._stops: list[str] = list(params.stop or [])
        self._include_stop = params.include_stop_str_in_output
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        # as vLLM: stop strings are looked for once the output has more than min_tokens tokens
        self._min_tokens = params.min_tokens
        self._num_tokens = 0

        context = [int(t) for t in prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:]]
        self._stream = self._new_stream(context)
        self._recent_ids: list[int] = context  # last ids whose text is already out (or in the prompt)
        self._pending_ids: list[int] = []  # ids the stream holds back (text ends mid-character, or none yet)
        self._byte_groups = self._tokenizer.token_to_id("<0x80>") is not None  # byte fallback (see _let_go)

        # Text as a list of parts so appending is O(1); output_text joins them lazily.
        self._parts: list[str] = []
        self._len = 0
        self._sent = 0  # characters already returned by get_delta
        self._stop: str | None = None

    # -- public -----------------------------------------------------------------------------------
    def update(self, new_token_ids: Sequence[int]) -> str | None:
        """Append tokens; return the stop string that matched (the sequence must finish), else None.

        On a match, output_text is truncated before the stop string (or after it when
        include_stop_str_in_output), and later tokens are ignored.
        """
        if self._stop is not None or len(new_token_ids) == 0:
            return None
        self._num_tokens += len(new_token_ids)
        return self._append(self._step([int(t) for t in new_token_ids]))

    @property
    def output_text(self) -> str:
        """All text decoded so far (stop string removed), including what get_delta still holds back."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the sequence, if any."""
        return self._stop

    def get_delta(self, finished: bool) -> str:
        """Text not yet returned by earlier calls.

        While not finished it holds back the trailing characters that could still begin a stop string
        (at most longest stop - 1), so a streamed stop string never leaks; when finished it also flushes
        bytes the decoder still withholds and returns everything left.
        """
        if finished:
            self._flush()
            end = self._len
        else:
            end = self._len - self._holdback()
        if end <= self._sent:
            return ""
        delta = self._suffix(self._len - self._sent)[: end - self._sent]
        self._sent = end
        return delta

    # -- decoding ---------------------------------------------------------------------------------
    def _new_stream(self, context: list[int]) -> DecodeStream:
        """A DecodeStream whose window starts with context, which it treats as already-returned text."""
        return DecodeStream(ids=self._seed(context), skip_special_tokens=self._skip_special)

    def _seed(self, context: list[int]) -> list[int]:
        # DecodeStream only takes the seed as its prefix when it decodes cleanly; a seed ending
        # mid-character (e.g. a prompt given as ids) would leak its own text into the output.
        if context and self._decode(context).endswith(_REPLACEMENT_CHAR):
            return []
        return context

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _step(self, ids: list[int]) -> str:
        """Feed ids to the stream; return the text they complete ('' while a character is incomplete)."""
        try:
            text = self._stream.step(self._tokenizer, ids)
        except Exception:  # noqa: BLE001 - tokenizers raises a plain Exception
            # DecodeStream raises when decoding the longer window changes earlier text (decoders
            # that clean up or strip by context); restart it from the last good boundary.
            return self._resync(ids)
        if text is None:
            before = len(self._pending_ids)
            self._pending_ids.extend(ids)
            # tried each _HELD_TAIL ids, not each token: a run that cannot be cut would pay its decodes every step
            held = len(self._pending_ids)
            return self._let_go() if held > _MAX_HELD_TOKENS and before // _HELD_TAIL != held // _HELD_TAIL else ""
        self._mark_emitted(ids)
        return text

    def _let_go(self) -> str:
        """The text of a long run of held ids but its last _HELD_TAIL, whose replay restarts the stream (after
        _recent_ids, as _resync does), so each step decodes a bounded window. Only where the text splits unchanged
        and no UTF-8 sequence can still span the cut (the head ends on a character, or the tail holds 3+); else
        the run waits a token and the cut moves. Runs with text wait too where a cut may change it: byte-fallback
        vocabularies decode a run of <0xNN> tokens as one group (all U+FFFD if any byte is invalid), and after a
        context ending mid-character (a prompt given as ids) the text depends on how the run ends."""
        held, context = self._pending_ids, self._seed(self._recent_ids)
        head, tail = held[:-_HELD_TAIL], held[-_HELD_TAIL:]
        first, rest = self._decode_after(context, head), self._decode_after(context, tail)
        whole = self._decode_after(context, held)
        if first + rest != whole or (first.endswith(_REPLACEMENT_CHAR) and len(rest) < 3) \
                or (whole and (self._byte_groups or context != self._recent_ids)):
            return ""
        self._pending_ids = []
        self._stream = self._new_stream(context)
        return first + self._step(tail)

    def _resync(self, ids: list[int]) -> str:
        """Restart the stream from the last good boundary and replay the ids it had not finished."""
        held = self._pending_ids + ids
        self._pending_ids = []
        self._stream = self._new_stream(self._recent_ids)
        try:
            text = self._stream.step(self._tokenizer, held)
        except Exception:  # noqa: BLE001 - tokenizers raises a plain Exception
            # The window itself trips the decoder: decode these ids by hand and restart after them.
            text = self._decode_after(self._seed(self._recent_ids), held)
            self._mark_emitted(held)
            self._stream = self._new_stream(self._recent_ids)
            return text
        if text is None:
            self._pending_ids = held
            return ""
        self._mark_emitted(held)
        return text

    def _mark_emitted(self, ids: list[int]) -> None:
        self._recent_ids = (self._recent_ids + self._pending_ids + ids)[-_RECENT_TOKENS:]
        self._pending_ids = []

    def _decode_after(self, context: list[int], ids: list[int]) -> str:
        """Text that ids add after context (context gives leading-space handling its left neighbour)."""
        before = self._decode(context)
        after = self._decode(context + ids)
        return after[len(before):] if after.startswith(before) else self._decode(ids)

    def _flush(self) -> None:
        """At the end, emit what the stream withholds (an incomplete character decodes to U+FFFD)."""
        if self._stop is None and self._pending_ids:
            # after the context the stream itself started from (none when the prompt ends mid-character: its
            # bytes would merge with the output's and change how many U+FFFD the output shows)
            text = self._decode_after(self._seed(self._recent_ids), self._pending_ids)
            self._mark_emitted([])
            self._append(text)

    # -- text and stop strings ---------------------------------------------------------------------
    def _append(self, text: str) -> str | None:
        """Add decoded text; on a stop string, truncate and return it."""
        if not text:
            return None
        tail = self._suffix(self._max_stop_len - 1) if self._stops else ""
        window_start = self._len - len(tail)
        self._parts.append(text)
        self._len += len(text)
        if not self._stops or self._num_tokens <= self._min_tokens:
            return None
        match = self._find_stop(tail + text, len(tail))
        if match is None:
            return None
        pos, stop = match
        cut = window_start + pos + (len(stop) if self._include_stop else 0)
        self._truncate(max(cut, self._sent))  # held-back deltas keep cut >= _sent; never unsend text
        self._stop = stop
        return stop

    def _find_stop(self, window: str, new_from: int) -> tuple[int, str] | None:
        """Earliest stop string in window that ends in its new text (from new_from on; as vLLM: the tail is
        sized for the longest stop, so a shorter one may lie wholly in it, written while min_tokens kept stop
        strings unchecked, and it must not stop now); at equal starts the shorter one, as it completes first."""
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = window.find(stop, max(new_from - len(stop) + 1, 0))
            if pos >= 0 and (best is None or (pos, len(stop)) < (best[0], len(best[1]))):
                best = (pos, stop)
        return best

    def _holdback(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        if self._stop is not None or not self._stops:
            return 0
        tail = self._suffix(self._max_stop_len - 1)
        best = 0
        for stop in self._stops:
            # such a suffix starts at a copy of the stop's first character: jump between those (str.find), not
            # compare every suffix length (O(len(stop)^2) per step: 120 us for a 300-character stop)
            i = tail.find(stop[0], max(len(tail) - len(stop), 0))
            while 0 <= i < len(tail) - best:
                if stop.startswith(tail[i:]):
                    best = len(tail) - i
                    break
                i = tail.find(stop[0], i + 1)
        return best

    def _suffix(self, n: int) -> str:
        """The last n characters of the text, touching only the parts that hold them."""
        if n <= 0:
            return ""
        pieces: list[str] = []
        size = 0
        for part in reversed(self._parts):
            if size >= n:
                break
            pieces.append(part)
            size += len(part)
        joined = "".join(reversed(pieces))
        return joined[-n:]

    def _truncate(self, length: int) -> None:
        while self._parts and self._len - len(self._parts[-1]) >= length:
            self._len -= len(self._parts.pop())
        if self._len > length:
            keep = len(self._parts[-1]) - (self._len - length)
            self._parts[-1] = self._parts[-1][:keep]
            self._len = length
