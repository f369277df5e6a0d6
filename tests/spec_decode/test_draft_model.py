"""Draft-model speculation: a draft identical to the target is always right; another draft (another family,
so another KV shape) leaves greedy output unchanged; a draft with another vocabulary is refused."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from meshserve import LLM, SamplingParams
from meshserve.errors import InvalidArgumentError, ModelLoadError, PromptTooLongError
from tests.conftest import VOCAB


def _prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt_token_ids": [rng.randrange(3, VOCAB) for _ in range(9 + 6 * i)]} for i in range(n)]


def _draft(model: str, k: int = 3) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": k}


@pytest.fixture(scope="module")
def expected(tiny_model_dir):
    llm = LLM(model=tiny_model_dir("llama"), block_size=4, max_model_len=256)

    def run(prompts, params):
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    return run


def test_draft_equal_to_target_is_always_accepted(tiny_model_dir, expected):
    target = tiny_model_dir("llama")
    prompts = _prompts(4)
    params = SamplingParams(temperature=0, max_tokens=25, ignore_eos=True)
    llm = LLM(model=target, block_size=4, max_model_len=256, speculative_config=_draft(target))
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == expected(prompts, params)
    stats = llm.engine.core.speculator.stats
    assert stats.acceptance_rate > 0.98, stats  # fp32 ties aside, the draft is the target
    assert stats.mean_acceptance_length > 3.5


def test_other_draft_keeps_greedy_output_with_preemption_and_prefix_hits(tiny_model_dir, expected):
    target, draft = tiny_model_dir("llama"), tiny_model_dir("qwen3")  # same vocabulary, other shapes
    shared = _prompts(1, seed=4)[0]["prompt_token_ids"] * 2
    prompts = [{"prompt_token_ids": shared + [7 + i]} for i in range(3)] + _prompts(2, seed=5)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, n=2)
    llm = LLM(
        model=target,
        block_size=4,
        max_model_len=256,
        num_gpu_blocks_override=48,
        speculative_config=_draft(draft, k=2),
    )
    out = llm.generate(prompts, params, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in out] == expected(prompts, params)
    stats = llm.engine.stats()
    assert (
        stats["spec_num_draft_tokens"] > 0 and stats["num_preemptions"] > 0 and stats["prefix_cache_hits"] > 0
    )


def test_cpu_pool_of_one_sequence_holds_a_whole_context_beside_the_draft(tiny_model_dir, expected):
    """On CPU the pool is capped at every sequence at full length. The draft's share of the budget was taken
    from that cap too, so with max_num_seqs=1 a 183-token prompt was refused (168 tokens of room for a context
    of 256); a pool of exactly max_model_len then hung the longest requests, which also need the draft's
    lookahead slots at their last step (they preempted themselves and recomputed forever)."""
    target = tiny_model_dir("llama")
    llm = LLM(model=target, block_size=4, max_model_len=64, max_num_seqs=1, speculative_config=_draft(target))
    prompts = [{"prompt_token_ids": list(range(3, 3 + 50))}]
    params = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True)
    out = llm.generate(prompts, params, use_tqdm=False)  # 64 tokens: the whole context
    assert [[c.token_ids for c in o.outputs] for o in out] == expected(prompts, params)
    assert llm.engine.core.config.cache_config.num_blocks == 17  # 64 tokens + 3 lookahead slots, blocks of 4


def test_a_request_the_pool_holds_only_without_the_lookahead_is_refused(tiny_model_dir):
    target = tiny_model_dir("llama")
    llm = LLM(model=target, block_size=4, max_model_len=32, num_gpu_blocks_override=8,
              speculative_config=_draft(target))
    prompt = [{"prompt_token_ids": list(range(3, 23))}]  # 20 tokens; the pool holds 32, less 3 lookahead slots
    with pytest.raises(PromptTooLongError, match="can never fit the KV cache"):
        llm.generate(prompt, SamplingParams(max_tokens=12), use_tqdm=False)
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=9, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 9


def test_draft_sampling_runs_and_is_seeded(tiny_model_dir):
    target = tiny_model_dir("llama")
    llm = LLM(model=target, block_size=4, max_model_len=256, speculative_config=_draft(target))
    params = SamplingParams(temperature=0.8, max_tokens=20, seed=1, ignore_eos=True)
    a = llm.generate(_prompts(2), params, use_tqdm=False)
    b = llm.generate(_prompts(2), params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    # argmax drafts are accepted with the target's probability of that token (flat on a random model)
    assert llm.engine.core.speculator.stats.num_accepted_tokens > 0


def test_draft_with_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "draft"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["vocab_size"] = VOCAB + 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgumentError, match="vocabulary") as e:
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft(str(folder)))
    assert "\n" not in str(e.value)


def test_a_draft_without_weights_names_the_draft(tiny_model_dir, tmp_path):
    """The loader's 'no *.safetensors weights in DIR' did not say it was the draft's folder, not the target's."""
    folder = tmp_path / "draft"
    folder.mkdir()
    shutil.copy(f"{tiny_model_dir('llama')}/config.json", folder / "config.json")
    with pytest.raises(ModelLoadError, match=f"^speculative_config.model: no \\*.safetensors weights in {folder}"):
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft(str(folder)))


def test_a_missing_draft_folder_names_the_draft(tiny_model_dir):
    """It read "model not found: /nonexistent ...", as if the target were missing."""
    with pytest.raises(ModelLoadError, match="^speculative_config.model: model not found: /nonexistent"):
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft("/nonexistent"))


def test_a_draft_with_another_tokenizer_of_the_same_size_is_refused(tiny_model_dir, tmp_path):
    """Same vocab_size, other ids: every proposal would be rejected (it ran, at the cost of a draft model)."""
    folder = tmp_path / "draft"
    shutil.copytree(tiny_model_dir("llama"), folder)
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ids = sorted(vocab.values())
    tok["model"]["vocab"] = {t: ids[(ids.index(i) + 7) % len(ids)] for t, i in vocab.items()}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidArgumentError, match="^speculative_config.model: the draft's tokenizer") as e:
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft(str(folder)))
    assert "\n" not in str(e.value)


def test_an_eagle3_head_as_a_draft_model_says_which_method(tiny_model_dir, tmp_path):
    from meshserve.models.loader import load_hf_config
    from meshserve.spec_decode.eagle3_random_head import head_config, random_head_tensors, write_head

    cfg = load_hf_config(tiny_model_dir("llama"))
    head = write_head(str(tmp_path / "head"), head_config(cfg, VOCAB), random_head_tensors(cfg, VOCAB))
    with pytest.raises(InvalidArgumentError, match='is an EAGLE-3 head .*: set "method": "eagle3"'):
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft(head))


def test_a_draft_of_a_shorter_context_names_the_max_model_len_that_fits(tiny_model_dir, tmp_path):
    folder = tmp_path / "draft"
    shutil.copytree(tiny_model_dir("llama"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgumentError, match="fewer than max_model_len .*set --max-model-len 64"):
        LLM(model=tiny_model_dir("llama"), speculative_config=_draft(str(folder)))
