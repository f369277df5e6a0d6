"""EAGLE-3 speculation with random heads written in the public checkpoint layout: the target's captured hidden
states are the HF model's; greedy output is the target's whatever the head proposes (with preemption, prefix
hits, chunked prefill, n > 1); a head whose proposal is known gets exactly that proposal verified; sampling
runs; a checkpoint that does not fit the target is a one-line error."""

from __future__ import annotations

import collections
import itertools
import random

import pytest
import torch
from transformers import AutoConfig

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError
from meshserve.spec_decode.eagle3 import Eagle3Proposer, aux_layer_ids
from meshserve.spec_decode.eagle3_random_head import head_config, random_head_tensors, write_head
from tests.conftest import VOCAB, make_tiny_checkpoint

DRAFT_VOCAB = 64


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> str:
    """A tiny Llama of 8 layers: vLLM's default layers (2, 4, 5) exist."""
    return make_tiny_checkpoint(str(tmp_path_factory.mktemp("eagle3-target")), "llama", num_hidden_layers=8)


@pytest.fixture(scope="module")
def target_config(target):
    return AutoConfig.from_pretrained(target)


@pytest.fixture(scope="module")
def head(target_config, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("eagle3-head"))
    return write_head(
        path, head_config(target_config, DRAFT_VOCAB), random_head_tensors(target_config, DRAFT_VOCAB)
    )


@pytest.fixture(scope="module")
def expected(target):
    llm = LLM(model=target, block_size=4, max_model_len=256)

    def run(prompts, params):
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    return run


def _spec(model: str, k: int = 3) -> dict:
    return {"method": "eagle3", "model": model, "num_speculative_tokens": k}


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(9 + 6 * i)]} for i in range(n)]


def _recording(monkeypatch) -> list[dict[str, list[int]]]:
    """Every proposal the EAGLE-3 proposers make from now on, step by step."""
    seen: list[dict[str, list[int]]] = []
    propose = Eagle3Proposer.propose

    def record(self, scheduled, result):
        out = propose(self, scheduled, result)
        seen.append(out)
        return out

    monkeypatch.setattr(Eagle3Proposer, "propose", record)
    return seen


@pytest.fixture(scope="module")
def llm(target, head):
    return LLM(model=target, block_size=4, max_model_len=256, speculative_config=_spec(head))


def test_captured_hidden_states_are_the_targets_residual_stream(target, llm, hf_model):
    prompt = _prompts(1, seed=3)[0]["prompt_token_ids"]
    # the prefill only: the buffer holds its rows
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    drafter = llm.engine.core.executor.runner.drafter
    with torch.no_grad():
        ref = hf_model(target)(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    ids = aux_layer_ids(drafter.model.config, 8)
    assert ids == [2, 4, 5]
    got = drafter.aux.rows(len(prompt)).view(len(prompt), 3, -1)
    for slot, layer in enumerate(ids):  # HF's hidden_states[i] is the input of layer i
        torch.testing.assert_close(got[:, slot], ref[layer][0], rtol=1e-4, atol=1e-4)


def test_a_pytorch_bin_head_proposes_as_its_safetensors_twin(
    target, target_config, llm, tmp_path, monkeypatch
):
    path = write_head(
        str(tmp_path / "bin-head"),
        head_config(target_config, DRAFT_VOCAB),
        random_head_tensors(target_config, DRAFT_VOCAB),
        bin_format=True,
    )
    seen = _recording(monkeypatch)
    prompts, params = _prompts(1, seed=8), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    runs = []
    for engine in (llm, LLM(model=target, block_size=4, max_model_len=256, speculative_config=_spec(path))):
        seen.clear()
        engine.generate(prompts, params, use_tqdm=False)
        runs.append([p for step in seen for p in step.values()])
    assert runs[0] and runs[0] == runs[1]


def test_greedy_output_is_the_targets_with_preemption_prefix_hits_and_chunks(target, head, expected):
    shared = _prompts(1, seed=4)[0]["prompt_token_ids"] * 2
    prompts = [{"prompt_token_ids": shared + [7 + i]} for i in range(3)] + _prompts(2, seed=5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    llm = LLM(
        model=target,
        block_size=4,
        max_model_len=256,
        num_gpu_blocks_override=48,
        enable_chunked_prefill=True,
        max_num_batched_tokens=16,
        speculative_config=_spec(head, k=3),
    )
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == expected(prompts, params)
    stats = llm.engine.stats()
    assert (
        stats["spec_num_draft_tokens"] > 0 and stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    )


def test_chunked_prefill_gives_the_head_the_same_positions(target, head, monkeypatch):
    """The last position of a prefill chunk waits for the next chunk's first token (its hidden state is
    carried): after a chunked prefill the head's KV and its proposals are those after a whole one."""
    seen = _recording(monkeypatch)
    prompts, params = _prompts(1, seed=6)[:1], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts[0]["prompt_token_ids"] *= 3  # 27 tokens: 4 chunks of 8
    runs, caches = [], []
    for kw in ({}, {"enable_chunked_prefill": True, "max_num_batched_tokens": 8}):
        seen.clear()
        llm = LLM(model=target, block_size=4, max_model_len=256, speculative_config=_spec(head), **kw)
        llm.generate(prompts, params, use_tqdm=False)
        runs.append([p for step in seen for p in step.values()])
        caches.append(llm.engine.core.executor.runner.drafter.kv_pool.tensors[0].clone())
    assert runs[0] and runs[0] == runs[1]
    assert caches[0].abs().sum() > 0
    torch.testing.assert_close(caches[0], caches[1], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def greedy_tokens(expected) -> tuple[list[dict], SamplingParams, list[list[int]]]:
    prompts, params = _prompts(3, seed=7), SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    return prompts, params, [o[0] for o in expected(prompts, params)]


def _constant_head(target_config, path, token: int) -> str:
    """A head that always proposes `token`: its final norm is zero, so every draft logit is 0 and the argmax
    is draft id 0, which d2t maps to `token`."""
    tensors = random_head_tensors(target_config, DRAFT_VOCAB, seed=1)
    tensors["norm.weight"].zero_()
    tensors["d2t"][0] = token
    return write_head(str(path), head_config(target_config, DRAFT_VOCAB), tensors)


def test_known_proposals_reach_verification(target, target_config, greedy_tokens, tmp_path, monkeypatch):
    prompts, params, ref = greedy_tokens
    counts = collections.Counter(t for out in ref for a, t in itertools.pairwise(out) if a == t)
    assert counts, "the tiny target repeats no token: pick another seed"
    repeated = counts.most_common(1)[0][0]  # the greedy output has runs of it: its proposals get accepted
    absent = next(t for t in range(3, VOCAB) if all(t not in out for out in ref))
    seen = _recording(monkeypatch)
    for token, accepted in ((repeated, True), (absent, False)):
        seen.clear()
        llm = LLM(
            model=target,
            block_size=4,
            max_model_len=256,
            speculative_config=_spec(_constant_head(target_config, tmp_path / str(token), token), k=2),
        )
        llm.engine.core.speculator.gate.step_model = None  # speculate every step, whatever the acceptance
        out = llm.generate(prompts, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in out] == ref
        assert seen and all(p == [token, token] for step in seen for p in step.values())
        stats = llm.engine.core.speculator.stats
        assert stats.num_draft_tokens > 0
        assert (stats.num_accepted_tokens > 0) == accepted, (token, stats)


def test_sampling_uses_rejection_sampling_and_is_seeded(llm, monkeypatch):
    from meshserve.engine import step_sampler

    temperatures = []
    verify = step_sampler.verify_on_device

    def spy(logits, drafts, params, *args, **kw):
        temperatures.extend(p.temperature for p in params)
        return verify(logits, drafts, params, *args, **kw)

    monkeypatch.setattr(step_sampler, "verify_on_device", spy)
    params = SamplingParams(temperature=0.8, max_tokens=20, seed=1, ignore_eos=True)
    a = llm.generate(_prompts(2), params, use_tqdm=False)
    b = llm.generate(_prompts(2), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    assert all(len(o.outputs[0].token_ids) == 20 for o in a)
    assert temperatures and set(temperatures) == {0.8}  # the head's proposals went through rejection sampling


def _broken(target_config, path, drop=(), **config):
    tensors = random_head_tensors(target_config, DRAFT_VOCAB)
    for name in drop:
        del tensors[name]
    return write_head(str(path), {**head_config(target_config, DRAFT_VOCAB), **config}, tensors)


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda c, p: _broken(c, p, drop=["midlayer.self_attn.q_proj.weight"]),
            "lacks 1 tensors, e.g. midlayer",
        ),
        (lambda c, p: _broken(c, p, drop=["d2t"]), "needs d2t"),
        (
            lambda c, p: _broken(c, p, intermediate_size=100),
            "midlayer.mlp.gate_proj.weight is [192, 96], its config",
        ),
        (lambda c, p: _broken(c, p, target_hidden_size=64), "target hidden states of size 64"),
        (lambda c, p: _broken(c, p, vocab_size=VOCAB + 64), "vocabulary"),
        (lambda c, p: _broken(c, p, draft_vocab_size=32), "lm_head is [64, 96], expected [32, 96]"),
        (lambda c, p: _broken(c, p, architectures=["LlamaForCausalLM"]), "is not an EAGLE-3 head"),
        (lambda c, p: _broken(c, p, eagle_aux_hidden_state_layer_ids=[1, 1, 9]), "not 3 distinct layers"),
        (lambda c, p: str(p / "nowhere"), "not an EAGLE-3 checkpoint folder"),
    ],
)
def test_checkpoints_that_do_not_fit_are_one_line_errors(target, target_config, tmp_path, make, message):
    path = make(target_config, tmp_path)
    with pytest.raises(InvalidArgumentError) as e:
        LLM(model=target, speculative_config=_spec(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_head_for_a_small_target_needs_its_layer_ids(tiny_model_dir, head):
    # 2 layers: vLLM's default (2, 1, -1) is out of range
    with pytest.raises(InvalidArgumentError, match="default layers"):
        LLM(model=tiny_model_dir("llama"), speculative_config=_spec(head))


@pytest.mark.slow
def test_tp2_head_runs_sharded_and_greedy_is_exact(target, target_config, greedy_tokens, tmp_path):
    """Two ranks on gloo: the head's attention and MLP shard like the target's, the embedding is the target's
    (vocab-parallel), fc and d2t are replicated; a head that always proposes a repeated token gets accepted."""
    prompts, params, ref = greedy_tokens
    counts = collections.Counter(t for out in ref for a, t in itertools.pairwise(out) if a == t)
    head = _constant_head(target_config, tmp_path / "head", counts.most_common(1)[0][0])
    llm = LLM(
        model=target,
        block_size=4,
        tensor_parallel_size=2,
        num_gpu_blocks_override=64,
        speculative_config=_spec(head, k=2),
    )
    llm.engine.core.speculator.gate.step_model = None  # speculate every step, whatever the acceptance
    try:
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)] == ref
        stats = llm.engine.stats()
        assert stats["spec_num_draft_tokens"] > 0 and stats["spec_num_accepted_tokens"] > 0
    finally:
        llm.shutdown()
