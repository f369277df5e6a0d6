"""The official `openai` client against a live server: completions and chat, streamed and whole."""

from __future__ import annotations

import asyncio

import openai
import pytest

from meshserve import LLM, SamplingParams
from tests.serve.conftest import MODEL, wait_idle

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.v1, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), max_model_len=512)
    yield llm
    llm.shutdown()


def test_models_lists_served_names(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "tiny-alias"]


def test_completion_greedy_equals_offline_engine(client, offline):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12), use_tqdm=False)[0]
    choice = resp.choices[0]
    assert choice.text == ref.outputs[0].text
    assert choice.finish_reason == ref.outputs[0].finish_reason
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert resp.model == MODEL and resp.object == "text_completion"


def test_chat_greedy_equals_offline_engine(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert resp.choices[0].message.content == ref.outputs[0].text
    assert resp.choices[0].message.role == "assistant"
    assert resp.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert resp.usage.completion_tokens == len(ref.outputs[0].token_ids)


def test_completion_stream_equals_whole(client):
    whole = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_stream_deltas_and_usage_chunk(client):
    messages = [{"role": "user", "content": "Count to three"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [whole.choices[0].finish_reason]
    assert chunks[-1].choices == []
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):  # cached_tokens may differ
        assert getattr(chunks[-1].usage, key) == getattr(whole.usage, key)
    assert all(c.usage is None for c in chunks[:-1])


def test_n_choices_and_list_prompts(client):
    resp = client.completions.create(model=MODEL, prompt=["Hello", [5, 6, 7, 8]], n=3, max_tokens=5,
                                     temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in resp.choices) == list(range(6))
    assert resp.usage.completion_tokens == 6 * 5
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_completion_tokens=4, temperature=1.0, seed=1,
                                          extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_n_choices_streamed(client):
    chunks = list(client.completions.create(model=MODEL, prompt="Hello", n=2, max_tokens=6, temperature=1.0,
                                            seed=3, stream=True, extra_body={"ignore_eos": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}


def test_seed_reproducible(client):
    kwargs = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 1.0,
              "extra_body": {"ignore_eos": True}}
    a = client.completions.create(seed=1234, **kwargs).choices[0].text
    b = client.completions.create(seed=1234, **kwargs).choices[0].text
    c = client.completions.create(seed=4321, **kwargs).choices[0].text
    assert a == b and a != c


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[4:6] if len(base) > 6 else base[-1]
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop],
                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text and base.startswith(choice.text)
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=20, temperature=0,
                                              stop=stop, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_completion_logprobs_and_echo(client):
    resp = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(x <= 0 for x in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    for tok, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert abs(tok - max(top.values())) < 1e-5 and 1 <= len(top) <= 4  # texts may collide
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                     echo=True, extra_body={"ignore_eos": True})
    assert echo.choices[0].text == PROMPT + resp.choices[0].text
    elp = echo.choices[0].logprobs
    assert elp.token_logprobs[0] is None and len(elp.tokens) == echo.usage.prompt_tokens + 5
    assert "".join(elp.tokens[:echo.usage.prompt_tokens]) == PROMPT
    # streamed, the first chunk carries the echoed prompt's logprobs before its own: the same in all
    streamed = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                              echo=True, stream=True, extra_body={"ignore_eos": True}))
    chunks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for lp in chunks for t in lp.tokens] == elp.tokens
    assert [x for lp in chunks for x in lp.token_logprobs] == elp.token_logprobs

    # ... and each chunk's text_offset continues where the previous chunk's tokens ended (it restarted at 0)
    assert [o for lp in chunks for o in lp.text_offset] == elp.text_offset
    plain = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1,
                                           stream=True, extra_body={"ignore_eos": True}))
    offsets = [o for c in plain if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    assert offsets == lp.text_offset


def test_continuous_usage_stats(client):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries the usage so far (it was ignored)."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, stream=True,
                                            stream_options=opts, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in chunks[:-1]]
    assert counts == sorted(counts) and counts[-1] == 6 and chunks[-1].usage.completion_tokens == 6
    assert len({c.usage.prompt_tokens for c in chunks}) == 1
    messages = [{"role": "user", "content": "hi"}]
    chat = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, n=2,
                                               stream=True, stream_options=opts, extra_body={"ignore_eos": True}))
    assert all(c.usage is not None for c in chat)
    assert [c.usage.completion_tokens for c in chat[:2]] == [0, 0]  # the role chunks
    per_choice = {c.choices[0].index: c.usage.completion_tokens for c in chat if c.choices}
    assert per_choice == {0: 5, 1: 5} and chat[-1].choices == [] and chat[-1].usage.completion_tokens == 10
    # without include_usage it stays off, as in vLLM
    plain = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=3, stream=True,
                                                stream_options={"continuous_usage_stats": True}))
    assert all(c.usage is None for c in plain)


def test_chat_logprobs(client):
    resp = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"ignore_eos": True})
    content = resp.choices[0].logprobs.content
    assert len(content) == 4
    for item in content:
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert abs(item.logprob - item.top_logprobs[0].logprob) < 1e-5
    streamed = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                                   stream=True, extra_body={"ignore_eos": True}))
    tokens = [t.token for c in streamed if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert tokens == [t.token for t in content]


def test_64_concurrent_streams(live):
    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, int]:
        stream = await client.completions.create(model=MODEL, prompt=f"Request {i}:", max_tokens=24,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        text, usage = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage:
                usage = chunk.usage.completion_tokens
        return text, usage

    async def main():
        client = openai.AsyncOpenAI(base_url=live.v1, api_key="x", max_retries=0, timeout=120)
        results = await asyncio.gather(*(one(client, i) for i in range(64)))
        await client.close()
        return results

    results = asyncio.run(main())
    assert len(results) == 64 and all(usage == 24 for _, usage in results)
    sync = openai.OpenAI(base_url=live.v1, api_key="x", max_retries=0)
    for i in (0, 31, 63):  # each stream is the greedy text it would have been alone
        alone = sync.completions.create(model=MODEL, prompt=f"Request {i}:", max_tokens=24, temperature=0,
                                        extra_body={"ignore_eos": True}).choices[0].text
        assert results[i][0] == alone
    assert wait_idle(live.allm)["kv_cache_usage"] == 0.0
