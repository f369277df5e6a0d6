"""Structured outputs after a reasoning span, inside the engine on a tiny random model: a request whose
constraint names an end-of-reasoning token (reasoning_end_token_id, set by the chat server's reasoning parser)
samples freely until that token, then follows its grammar from the next token on; one without it is
constrained from its first token (a prompt that already closed the span). The tiny model's free choices are
noise, so a reasoning part the grammar would refuse shows it was not masked, and the valid answer after it
is the grammar's doing."""

from __future__ import annotations

import json

import jsonschema
import pytest

from meshserve import LLM, SamplingParams
from tests.reasoning_model import make_reasoning_checkpoint, reasoning_tokenizer

xgr = pytest.importorskip("xgrammar")

SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Rome", "Paris"]}, "n": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["city", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return make_reasoning_checkpoint(str(tmp_path_factory.mktemp("reasoning-model")))


def _grammar_accepts(tokenizer, token_ids: list[int]) -> bool:
    """Whether a fresh matcher of SCHEMA (as the engine compiles it) accepts these tokens, in order."""
    from meshserve.structured.grammar import compile_structured_outputs
    from meshserve.structured.params import StructuredOutputsParams

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=320, stop_token_ids=[2])
    compiled = compile_structured_outputs(xgr.GrammarCompiler(info), StructuredOutputsParams(json=SCHEMA))
    matcher = xgr.GrammarMatcher(compiled)
    return all(matcher.accept_token(t) for t in token_ids)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_grammar_starts_after_the_end_of_reasoning(path, async_scheduling):
    tok = reasoning_tokenizer()
    end = tok.convert_tokens_to_ids("</think>")
    llm = LLM(model=path, async_scheduling=async_scheduling, max_model_len=256)
    try:
        # the bias makes the random model close its thought after a few free tokens
        thinking = SamplingParams(n=3, max_tokens=150, temperature=1.0, seed=3, logit_bias={end: 4.0},
                                  structured_outputs={"json": SCHEMA, "reasoning_end_token_id": end})
        at_once = SamplingParams(max_tokens=150, temperature=1.0, seed=3, logit_bias={end: 4.0},
                                 structured_outputs={"json": SCHEMA})
        thought, direct = llm.generate([[5, 6, 7, 8] * 5, [9, 10, 11] * 5], [thinking, at_once], use_tqdm=False)
    finally:
        llm.shutdown()
    free = 0
    for c in thought.outputs:
        assert end in c.token_ids, c.token_ids
        k = c.token_ids.index(end)
        reasoning, answer = c.token_ids[:k], c.token_ids[k + 1:]
        free += not _grammar_accepts(tok, reasoning)  # unmasked noise: the grammar would refuse it
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(tok.decode(answer, skip_special_tokens=True)), SCHEMA)
        assert _grammar_accepts(tok, answer)
    assert free >= 1  # at least one thought that a mask would have prevented
    (c,) = direct.outputs
    assert end not in c.token_ids  # constrained from its first token: the end tag is not JSON
    jsonschema.validate(json.loads(c.text), SCHEMA)


def test_reasoning_end_token_id_is_checked():
    from meshserve.errors import InvalidArgumentError
    from meshserve.structured.params import StructuredOutputsParams

    for bad in (-1, True, "5"):
        with pytest.raises(InvalidArgumentError, match="reasoning_end_token_id"):
            StructuredOutputsParams(json=SCHEMA, reasoning_end_token_id=bad)
    a, b = StructuredOutputsParams(json=SCHEMA), StructuredOutputsParams(json=SCHEMA, reasoning_end_token_id=7)
    assert a.key == b.key  # one compiled grammar serves both
