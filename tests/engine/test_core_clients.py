"""One contract for the three ways to hold an engine core: in the caller's thread, in a thread, in a process."""

from __future__ import annotations

import random

import pytest

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.core_client import EngineCoreClient, InprocCoreClient, ThreadedCoreClient
from meshserve.engine.core_process import ProcessCoreClient
from meshserve.engine.messages import EngineCoreRequest
from meshserve.errors import PromptTooLongError
from meshserve.sampling import SamplingParams
from tests.conftest import VOCAB
from tests.engine.core_outputs import collect_outputs, finished_ids


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def _request(rid: str, seed: int, max_tokens: int, **params) -> EngineCoreRequest:
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **params)
    return EngineCoreRequest(rid, _ids(seed, 7), sp, max_tokens)


def _args(model_dir: str) -> EngineArgs:
    return EngineArgs(model=model_dir, block_size=4, max_model_len=128)


@pytest.fixture(scope="module", params=["inproc", "thread", "process"])
def client(request, tiny_model_dir) -> EngineCoreClient:
    args = _args(tiny_model_dir("llama"))
    if request.param == "process":
        c = ProcessCoreClient(args)
    elif request.param == "thread":
        c = ThreadedCoreClient(EngineCore.from_engine_args(args))
    else:
        c = InprocCoreClient(EngineCore.from_engine_args(args))
    yield c
    c.shutdown()
    assert not c.is_alive()


@pytest.fixture(scope="module")
def reference(tiny_model_dir) -> dict[int, list[int]]:
    """Greedy tokens of each prompt seed, from the offline LLM."""
    from meshserve import LLM

    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": _ids(s, 7)} for s in range(3)],
                        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    return {s: o.outputs[0].token_ids for s, o in enumerate(outs)}


def test_info_describes_the_core(client):
    info = client.info
    assert info.vocab_size == VOCAB and info.max_model_len == 128 and info.block_size == 4
    assert info.num_blocks > 0 and info.tokenizer and 2 in info.eos_token_ids


def test_each_token_once_and_the_same_tokens_as_offline(client, reference):
    for s in range(3):
        client.add_request(_request(f"r{s}", s, 6, logprobs=2 if s == 1 else None))
    got = collect_outputs(client, lambda g: finished_ids(g) >= {"r0", "r1", "r2"})
    for s in range(3):
        outs = [o for m in got for o in m.outputs if o.request_id == f"r{s}"]
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == reference[s]  # every token exactly once, in order
        assert all(len(o.new_token_ids) == 1 for o in outs)  # one new token per step: deltas
        assert [o.finish_reason for o in outs] == [None] * 5 + ["length"]
        logprobs = [lp for o in outs for lp in (o.new_logprobs or [])]
        assert len(logprobs) == (6 if s == 1 else 0)
        assert all(lp.token_id == t and len(lp.top_ids) == 2 for lp, t in zip(logprobs, tokens))
    assert all(m.stats is not None for m in got)
    assert got[-1].stats.num_running == 0 and got[-1].stats.generation_tokens >= 18


def test_abort_stops_a_request_and_publishes_its_release(client):
    client.add_request(_request("long", 5, 100))
    collect_outputs(client, lambda g: any(o.request_id == "long" for m in g for o in m.outputs))
    client.abort_requests(["long", "unknown"])
    # the counters show it gone, without a new request. The core reads the abort between steps, so what it
    # produced before (a busy client lags a separate core by several steps) still arrives, but the request
    # never reaches its end (100 tokens) and never reports a finish
    got = collect_outputs(
        client, lambda g: bool(g) and g[-1].stats.num_running == 0 and g[-1].stats.kv_cache_usage == 0
    )
    after = [o for m in got for o in m.outputs if o.request_id == "long"]
    assert sum(len(o.new_token_ids) for o in after) < 99
    if isinstance(client, InprocCoreClient):  # no thread between: at most the step already launched
        assert len(after) <= 1
    assert not finished_ids(got)


def test_refusals_reach_the_front_end(client):
    too_long = _request("huge", 1, 200)  # 7 + 200 tokens > max_model_len 128
    try:
        client.add_request(too_long)
    except PromptTooLongError:
        return  # the in-process core refuses at once
    got = collect_outputs(client, lambda g: any(m.errors for m in g))
    (err,) = [e for m in got for e in m.errors]
    assert err.request_id == "huge" and err.error_type == "PromptTooLongError" and err.param == "max_tokens"


def test_implements_the_protocol(client):
    assert isinstance(client, EngineCoreClient)
