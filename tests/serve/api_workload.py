"""A seeded random set of /v1/completions and /v1/chat/completions bodies, and the per-choice results of sending
one streamed or whole (the differential tests compare these between ways of answering the same request)."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import httpx

from tests.conftest import VOCAB

# pieces of the tiny tokenizer's corpus (tests/conftest.py): multi-byte characters, words, digits
PIECES = ["The capital", " of France", " is Paris.", " café", " naïve", " 東京", " 🙂", "Hello world,",
          " how are you", " today?", " numbers 0123456789", "\n", "User: hi", "Assistant: hello there"]
# single and multi-token stops, some spanning token boundaries ("o w" in "hello world"), multi-byte ones
STOPS = ["is", "ar", "ll", "o", "?", "9", "é", " the", "Paris", "東", "🙂", "o w", "ï", ", ", "lo t"]


@dataclass
class ApiRequest:
    endpoint: str  # "completions" or "chat/completions"
    body: dict
    # stop strings cut from the request's own answer without them (see with_observed_stops): a random tiny
    # model's bytes seldom contain a fixed word, so fixed STOPS alone would rarely stop anything
    observed_stops: int = 0


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 8)))


def make_requests(seed: int, count: int) -> list[ApiRequest]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        chat = rng.random() < 0.4
        body: dict = {"model": "tiny", "max_tokens": rng.randint(1, 40), "temperature": 0.0}
        if chat:
            turns = rng.randint(1, 3)
            body["messages"] = [{"role": "user" if t % 2 == 0 else "assistant", "content": _text(rng)}
                                for t in range(2 * turns - 1)]
        elif rng.random() < 0.5:
            body["prompt"] = _text(rng)
        else:
            body["prompt"] = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 60))]
        if rng.random() < 0.1 and not chat:
            body["prompt"] = [body["prompt"], _text(rng)]  # a batch of two prompts
        if rng.random() < 0.4:
            body.update(temperature=rng.uniform(0.5, 1.3), seed=rng.randrange(2**31))
            if rng.random() < 0.5:
                body.update(top_p=rng.uniform(0.5, 1.0), top_k=rng.choice([0, 5, 40]))
        if rng.random() < 0.25:
            body["n"] = rng.randint(2, 3)
        observed = 0
        if rng.random() < 0.5:
            body["stop"] = rng.sample(STOPS, rng.randint(1, 3))
            if rng.random() < 0.7:
                observed = rng.randint(1, 2)
            body["include_stop_str_in_output"] = rng.random() < 0.5
        if rng.random() < 0.3:
            body["stop_token_ids"] = rng.sample(range(3, VOCAB), 12)
        if rng.random() < 0.2:
            body["min_tokens"] = rng.randint(1, body["max_tokens"])
        if rng.random() < 0.2:
            body["ignore_eos"] = True
        if rng.random() < 0.2:
            body["skip_special_tokens"] = False
        if rng.random() < 0.35:
            if chat:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 4))
            else:
                body["logprobs"] = rng.randint(0, 4)
        if not chat:
            body["return_token_ids"] = rng.random() < 0.6
            body["echo"] = rng.random() < 0.2
        out.append(ApiRequest("chat/completions" if chat else "completions", body, observed))
    return out


def with_observed_stops(client: httpx.Client, base: str, req: ApiRequest, seed: int) -> ApiRequest:
    """req with its observed stops added: pieces of 1-4 characters (token boundaries inside some, partial
    characters' U+FFFD in others) from random places in the text it gives without stop strings (greedy and
    seeded requests answer the same again)."""
    if not req.observed_stops or req.body.get("echo"):  # echo: pieces of the prompt's text stop nothing
        return req
    rng = random.Random(seed)
    bare = {k: v for k, v in req.body.items() if k not in ("stop", "include_stop_str_in_output")}
    texts = [c.text for c in send(client, base, ApiRequest(req.endpoint, bare), stream=False).choices.values()]
    stops = list(req.body["stop"])
    for _ in range(req.observed_stops):
        text = rng.choice(texts)
        if text:
            start = rng.randrange(len(text))
            stops.append(text[start:start + rng.randint(1, 4)])
    return ApiRequest(req.endpoint, dict(req.body, stop=stops))


@dataclass
class Choice:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprob_tokens: list[str] = field(default_factory=list)  # one per token with logprobs (echo: prompt first)
    logprobs: list[float | None] = field(default_factory=list)
    prompt_token_ids: list[int] = field(default_factory=list)  # return_token_ids (streamed: in the first chunk)


@dataclass
class Result:
    choices: dict[int, Choice]
    usage: dict | None


def _fold(choice: Choice, c: dict, chat: bool) -> None:
    if chat:
        delta = c.get("delta") if "delta" in c else c.get("message")
        choice.text += (delta or {}).get("content") or ""
        for lp in (c.get("logprobs") or {}).get("content") or []:
            choice.logprob_tokens.append(lp["token"])
            choice.logprobs.append(lp["logprob"])
    else:
        choice.text += c["text"]
        choice.token_ids += c.get("token_ids") or []
        choice.prompt_token_ids += c.get("prompt_token_ids") or []
        lp = c.get("logprobs")
        if lp:
            choice.logprob_tokens += lp["tokens"]
            choice.logprobs += lp["token_logprobs"]
    if c.get("finish_reason") is not None:
        choice.finish_reason, choice.stop_reason = c["finish_reason"], c.get("stop_reason")


def send(client: httpx.Client, base: str, req: ApiRequest, stream: bool) -> Result:
    """The request's choices by index (stream deltas concatenated) and its usage (with include_usage when
    streamed)."""
    body = dict(req.body, stream=stream)
    if stream:
        body["stream_options"] = {"include_usage": True}
    chat = req.endpoint.startswith("chat")
    url = f"{base}/v1/{req.endpoint}"
    choices: dict[int, Choice] = {}
    usage = None
    if not stream:
        r = client.post(url, json=body)
        assert r.status_code == 200, (r.status_code, r.text, body)
        data = r.json()
        for c in data["choices"]:
            _fold(choices.setdefault(c["index"], Choice()), c, chat)
        return Result(choices, data["usage"])
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, (r.status_code, r.read(), body)
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", lines[-3:]
    for line in lines[:-1]:
        chunk = json.loads(line)
        assert "error" not in chunk, chunk
        for c in chunk["choices"]:
            _fold(choices.setdefault(c["index"], Choice()), c, chat)
        usage = chunk.get("usage") or usage
    return Result(choices, usage)
