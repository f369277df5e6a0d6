"""EngineCore speaks in deltas: each token once, and a step's message does not grow with the output."""

from __future__ import annotations

import random

import msgspec
import pytest

from meshserve.config import EngineArgs
from meshserve.engine.core import EngineCore
from meshserve.engine.messages import EngineCoreOutputs, EngineCoreRequest
from meshserve.sampling import SamplingParams
from tests.conftest import VOCAB


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    c = EngineCore.from_engine_args(EngineArgs(model=tiny_model_dir("llama"), block_size=4, max_model_len=256))
    yield c
    c.shutdown()


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def test_step_messages_carry_only_new_tokens(core):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, ignore_eos=True)
    for i in range(8):
        core.add_request(EngineCoreRequest(f"d{i}", _ids(i, 60), params, 40))
    sizes, tokens = [], {f"d{i}": [] for i in range(8)}
    while core.has_unfinished_requests():
        outs = core.step()
        decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(outs), type=EngineCoreOutputs)
        assert decoded == outs  # what crosses a process line is what was built
        if len(outs.outputs) == 8 and not any(o.finished for o in outs.outputs):
            sizes.append(len(msgspec.msgpack.encode(outs)))
        for o in outs.outputs:
            assert len(o.new_token_ids) <= 1
            tokens[o.request_id] += o.new_token_ids
    assert all(len(t) == 40 for t in tokens.values())
    # a message of 8 decoding requests stays the same size from the second token to the fortieth (the first
    # carries each request's prefix-cache count and scheduling time once); beside the tokens, the counters (with
    # vLLM's tokens-per-iteration histogram: ~50 bytes)
    sizes = sizes[1:]
    assert len(sizes) >= 30 and max(sizes) - min(sizes) <= 16 and max(sizes) < 8 * 40 + 170


def test_prompt_logprobs_come_once_per_position(core):
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1, ignore_eos=True)
    core.add_request(EngineCoreRequest("p", _ids(9, 30), params, 2))
    positions = []
    while core.has_unfinished_requests():
        for o in core.step().outputs:
            positions += o.new_prompt_logprobs or []
    assert [p.token_id for p in positions] == _ids(9, 30)[1:]
