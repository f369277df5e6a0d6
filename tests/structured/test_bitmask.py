"""Token bitmasks on tiny vocabularies: filled from a grammar, applied to logits exactly as the plain
reference (every disallowed token -inf, every allowed one untouched), on chosen rows only."""

from __future__ import annotations

import pytest
import torch
import xgrammar as xgr

from meshserve.structured.bitmask import (ALLOW_ALL, apply_bitmask, apply_bitmask_reference, bitmask_to_bool,
                                          fill_bitmask, fill_bitmasks)

VOCAB = ["a", "b", "c", "ab", "{", "}", '"', ":", " ", "1", "</s>"]
EOS = len(VOCAB) - 1


def _matcher(compile_fn):
    info = xgr.TokenizerInfo(VOCAB, stop_token_ids=[EOS])
    return xgr.GrammarMatcher(compile_fn(xgr.GrammarCompiler(info)))


def _reference_mask(allowed: torch.Tensor, logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    out = logits.clone()
    for k, r in enumerate(rows):
        for t in range(logits.shape[1]):
            if not allowed[k, t]:
                out[r, t] = float("-inf")
    return out


@pytest.mark.parametrize("vocab_size", [5, 32, 33, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_equals_reference_on_random_masks(vocab_size, dtype):
    gen = torch.Generator().manual_seed(vocab_size)
    words = (vocab_size + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, words), dtype=torch.int32, generator=gen)
    bitmask[[0, 2]] = ALLOW_ALL  # unconstrained rows of a mixed batch
    logits = torch.randn(4, vocab_size, generator=gen).to(dtype)
    rows = [1, 3]
    expected = _reference_mask(bitmask_to_bool(bitmask[rows], vocab_size), logits, rows)
    reference = logits.clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, expected)  # rows 0 and 2 untouched, the others masked bit by bit
    apply_bitmask_reference(reference, bitmask)
    assert torch.equal(reference, expected)


def test_apply_refuses_a_mask_per_other_rows():
    with pytest.raises(ValueError, match="2 bitmask rows for 3 rows"):
        apply_bitmask(torch.zeros(3, 40), torch.full((2, 2), ALLOW_ALL, dtype=torch.int32))


def test_fill_follows_the_grammar_token_by_token():
    m = _matcher(lambda c: c.compile_regex("ab?c"))
    allowed = bitmask_to_bool(fill_bitmask(m, len(VOCAB)), len(VOCAB))[0]
    assert {VOCAB[t] for t in allowed.nonzero().flatten().tolist()} == {"a", "ab"}
    assert m.accept_token(VOCAB.index("ab"))
    allowed = bitmask_to_bool(fill_bitmask(m, len(VOCAB)), len(VOCAB))[0]
    assert {VOCAB[t] for t in allowed.nonzero().flatten().tolist()} == {"c"}
    assert m.accept_token(VOCAB.index("c"))
    allowed = bitmask_to_bool(fill_bitmask(m, len(VOCAB)), len(VOCAB))[0]
    assert allowed.nonzero().flatten().tolist() == [EOS]  # complete: only a stop token may follow
    assert m.accept_token(EOS) and m.is_terminated()


def test_masked_greedy_decoding_spells_the_only_allowed_output():
    """Logits that prefer a forbidden token every step still decode to the grammar's string."""
    m = _matcher(lambda c: c.compile_grammar('root ::= "{" "1" "}"'))
    out = []
    while not m.is_terminated():
        logits = torch.zeros(1, len(VOCAB))
        logits[0, VOCAB.index("a")] = 10.0  # the model "wants" a
        apply_bitmask(logits, fill_bitmask(m, len(VOCAB)))
        token = int(logits.argmax())
        assert m.accept_token(token)
        out.append(token)
    assert [VOCAB[t] for t in out] == ["{", "1", "}", "</s>"]


def test_batch_fill_equals_one_by_one():
    matchers = [_matcher(lambda c: c.compile_regex("ab?c")), _matcher(lambda c: c.compile_grammar('root ::= "{" "1" "}"'))]
    matchers[0].accept_token(VOCAB.index("a"))
    batch = fill_bitmasks(matchers, len(VOCAB))
    assert torch.equal(batch, torch.cat([fill_bitmask(m, len(VOCAB)) for m in matchers]))
    assert {VOCAB[t] for t in bitmask_to_bool(batch, len(VOCAB))[0].nonzero().flatten().tolist()} == {"b", "c"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_apply_on_the_device_from_pinned_memory_equals_reference(rows):
    """The engine's GPU path: a pinned host mask, copied without blocking, our Triton kernel
    (kernels/triton_token_bitmask.py) on bf16 logits of SmolLM2's width; the same logits as the torch
    reference on the CPU."""
    gen = torch.Generator().manual_seed(rows)
    vocab = 49152
    bitmask = torch.randint(-(2**31), 2**31 - 1, (rows, vocab // 32), dtype=torch.int32, generator=gen).pin_memory()
    bitmask[0] = ALLOW_ALL
    logits = torch.randn(rows, vocab, generator=gen).to(torch.bfloat16)
    expected = logits.clone()
    apply_bitmask_reference(expected, bitmask)
    on_device = logits.cuda()
    apply_bitmask(on_device, bitmask)
    assert torch.equal(on_device.cpu(), expected)
