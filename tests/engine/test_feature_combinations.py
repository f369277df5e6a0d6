"""Differential fuzzing of engine features in combination: one seeded random workload (shared prefixes, stop
ids and strings, min_tokens, ignore_eos, n > 1, logprobs, prompt logprobs, penalties, greedy beside seeded
sampling) runs through a plain engine (fp32 on CPU, no prefix cache, no chunking, synchronous, a large KV cache)
and through engines with features on; every request must come back the same.

Greedy requests must give the same token ids, text, finish and stop reasons, and logprobs (within 1e-4). Seeded
sampled requests must too ("seed makes the request's samples reproducible whatever else is in the batch",
SamplingParams), except under speculative decoding, whose rejection sampler draws its randomness differently (it
keeps the distribution, not the draws: README's speculative decoding section), and whose draws follow how many
proposals each step verifies, which preemption and async scheduling change (measured: seeded requests differ
between n-gram alone and n-gram with a 40-block cache, or with async scheduling beside max_num_seqs 4)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from meshserve import LLM, SamplingParams
from tests.conftest import VOCAB, make_tiny_checkpoint

MAX_MODEL_LEN = 256
COMMON = dict(device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN, block_size=8, seed=0)
# 240 tokens at most a request (200 + 40): 30 blocks of 8; 40 blocks hold one or two requests at a time
TINY_CACHE = dict(num_gpu_blocks_override=40)
OFFLOAD = dict(kv_offloading_size=0.05, kv_offloading_verify=True)  # GiB: every block of a workload fits
NGRAM = dict(speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                 "prompt_lookup_max": 3})
PLAIN = dict(enable_prefix_caching=False, enable_chunked_prefill=False, max_num_batched_tokens=4096,
             async_scheduling=False)
# each beside PLAIN; what a config names on is added to PLAIN's everything-off
CONFIGS: dict[str, dict] = {
    "prefix-chunked": dict(enable_prefix_caching=True, enable_chunked_prefill=True, max_num_batched_tokens=32,
                           max_num_seqs=4),
    "preempt-recompute": dict(TINY_CACHE),
    "preempt-swap": dict(TINY_CACHE, preemption_mode="swap", **OFFLOAD),
    "async": dict(async_scheduling=True),
    "ngram": dict(NGRAM),
    "offload": dict(TINY_CACHE, enable_prefix_caching=True, **OFFLOAD),
    "everything": dict(TINY_CACHE, enable_prefix_caching=True, enable_chunked_prefill=True,
                       max_num_batched_tokens=32, max_num_seqs=4, preemption_mode="swap",
                       async_scheduling=True, **OFFLOAD, **NGRAM),
}
# the same with 16-token blocks: a block boundary falls inside more verify steps' proposals (a sequence swapped
# out with its verify step in flight kept CPU slots for the rejected ones and failed to resume: seed 4)
CONFIGS["everything-block16"] = dict(CONFIGS["everything"], block_size=16, num_gpu_blocks_override=20)


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams


def make_workload(seed: int) -> list[Request]:
    """20-40 requests; a third of the prompts extend one of three shared prefixes (prefix-cache hits)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, VOCAB) for _ in range(rng.randint(16, 120))] for _ in range(3)]
    requests = []
    for _ in range(rng.randint(20, 40)):
        length = rng.randint(1, 200)
        head = rng.choice(prefixes)[:length] if rng.random() < 0.35 else []
        prompt = head + [rng.randrange(3, VOCAB) for _ in range(length - len(head))]
        max_tokens = rng.randint(1, 40)
        p: dict = dict(max_tokens=max_tokens, temperature=0.0)
        if rng.random() < 0.4:
            p.update(temperature=rng.uniform(0.5, 1.3), seed=rng.randrange(2**31))
            if rng.random() < 0.5:
                p.update(top_p=rng.uniform(0.5, 1.0), top_k=rng.choice([0, 5, 40]))
        if rng.random() < 0.3:  # random tiny models repeat themselves: a dozen ids stop a fair share
            p["stop_token_ids"] = rng.sample(range(3, VOCAB), 12)
        if rng.random() < 0.15:  # text stops (the front end's): pieces of the tiny tokenizer's corpus
            p.update(stop=rng.sample(["is", "ar", "ll", "o", "?", "9", "é"], 2),
                     include_stop_str_in_output=rng.random() < 0.5)
        if rng.random() < 0.2:
            p["min_tokens"] = rng.randint(1, max_tokens)
        if rng.random() < 0.3:
            p["ignore_eos"] = True
        if rng.random() < 0.12:
            p["n"] = rng.randint(2, 3)
        if rng.random() < 0.3:
            p["logprobs"] = rng.randint(0, 4)
        if rng.random() < 0.1:
            p["prompt_logprobs"] = rng.randint(0, 3)
        if rng.random() < 0.25:
            p.update(presence_penalty=rng.uniform(-1, 1), frequency_penalty=rng.uniform(-1, 1),
                     repetition_penalty=rng.uniform(0.8, 1.3))
        requests.append(Request(prompt, SamplingParams(**p)))
    return requests


def run(path: str, workload: list[Request], **engine_kwargs):
    llm = LLM(model=path, **{**COMMON, **engine_kwargs})
    try:
        outs = llm.generate([{"prompt_token_ids": r.prompt} for r in workload], [r.params for r in workload],
                            use_tqdm=False)
        return outs, llm.engine.stats()
    finally:
        llm.shutdown()


def _close_logprobs(want, got, where: str) -> None:
    """Two lists of {token: Logprob} (or None entries) hold the same tokens and logprobs within 1e-4."""
    assert len(want) == len(got), where
    for pos, (w, g) in enumerate(zip(want, got)):
        if w is None or g is None:
            assert w is None and g is None, f"{where} position {pos}"
            continue
        assert set(w) == set(g), f"{where} position {pos}: top tokens {sorted(w)} vs {sorted(g)}"
        for tok in w:
            assert abs(w[tok].logprob - g[tok].logprob) <= 1e-4, \
                f"{where} position {pos} token {tok}: {w[tok].logprob} vs {g[tok].logprob}"


def assert_same_outputs(workload: list[Request], plain, other, seeded_too: bool) -> int:
    """Every greedy (and, if seeded_too, seeded sampled) request of `other` equals plain's. Returns how many
    requests were compared."""
    compared = 0
    for i, (req, want, got) in enumerate(zip(workload, plain, other)):
        if req.params.temperature > 0 and not seeded_too:
            continue
        compared += 1
        where = f"request {i} ({req.params}, prompt of {len(req.prompt)})"
        assert len(want.outputs) == len(got.outputs), where
        if req.params.prompt_logprobs is not None:
            _close_logprobs(want.prompt_logprobs, got.prompt_logprobs, f"{where} prompt logprobs")
        for w, g in zip(want.outputs, got.outputs):
            at = f"{where} completion {w.index}"
            assert (w.index, w.token_ids) == (g.index, g.token_ids), at
            assert (w.finish_reason, w.stop_reason, w.text) == (g.finish_reason, g.stop_reason, g.text), at
            if req.params.logprobs is not None:
                _close_logprobs(w.logprobs, g.logprobs, at)
    return compared


# the dense, the MoE and the MLA checkpoint; tied embeddings make these tiny random models repeat themselves now
# and then, so n-gram proposals are sometimes accepted (the untied llama accepted none of seed 0's 225)
FAMILIES = {"qwen3": {}, "qwen3_moe": {"tie_word_embeddings": True}, "deepseek_v3": {"tie_word_embeddings": True}}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """family -> folder of its tiny checkpoint (cached)."""
    cache = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = make_tiny_checkpoint(str(tmp_path_factory.mktemp(family)), family, **FAMILIES[family])
        return cache[family]

    return get


@pytest.fixture(scope="module")
def plain_outputs():
    """(checkpoint, seed) -> the workload and the plain engine's outputs for it (cached)."""
    cache = {}

    def get(path: str, seed: int):
        if (path, seed) not in cache:
            workload = make_workload(seed)
            cache[path, seed] = workload, run(path, workload, **PLAIN)[0]
        return cache[path, seed]

    return get


def check_config(path: str, seed: int, name: str, plain_outputs, **extra) -> dict:
    workload, plain = plain_outputs(path, seed)
    kwargs = {**PLAIN, **CONFIGS[name], **extra} if name in CONFIGS else {**PLAIN, **extra}
    other, stats = run(path, workload, **kwargs)
    assert_same_outputs(workload, plain, other, seeded_too="speculative_config" not in kwargs)
    return stats


def test_workload_exercises_the_features():
    """The generator makes what the comparisons rely on: shared prefixes, n > 1, both kinds of request."""
    workload = make_workload(0)
    assert 20 <= len(workload) <= 40
    params = [r.params for r in workload]
    assert any(p.n > 1 for p in params) and any(p.logprobs is not None for p in params)
    assert any(p.temperature == 0 for p in params) and any(p.seed is not None for p in params)
    assert any(p.stop_token_ids for p in params) and any(p.uses_penalties for p in params)
    assert any(p.stop for p in params)
    heads = {tuple(r.prompt[:16]) for r in workload if len(r.prompt) >= 16}
    assert len(heads) < sum(len(r.prompt) >= 16 for r in workload)  # some prompts share a prefix


@pytest.mark.parametrize("family, seed, name", [
    ("qwen3", 0, "everything"), ("qwen3_moe", 0, "everything"), ("qwen3_moe", 0, "preempt-recompute"),
    ("deepseek_v3", 0, "everything"), ("deepseek_v3", 1, "preempt-swap"),  # MLA's latent blocks
    ("qwen3", 4, "everything-block16"),  # the swap-during-verify case (scheduler._update_speculative)
    ("qwen3", 2, "ngram"),  # an accepted run ending in a stop token lost its text (output_processor.py)
])
def test_feature_combination_matches_plain(family, seed, name, model_dir, plain_outputs):
    stats = check_config(model_dir(family), seed, name, plain_outputs)
    if "num_gpu_blocks_override" in CONFIGS[name]:
        assert stats["num_preemptions"] > 0  # the tiny cache did preempt


@pytest.mark.parametrize("family", ["qwen3", "qwen3_moe"])  # the tiny MLA model's proposals are never accepted
def test_seeded_speculation_is_independent_of_the_batch(family, model_dir):
    """Under n-gram speculation, seeded requests give the same tokens in batches of 4 with chunked prefill and
    prefix hits as with everything at once (a seeded row drew as many uniforms as the batch's longest
    proposals: rejection_sampler._uniforms). Preemption and async scheduling change how many proposals a
    step verifies, and with that a seeded request's draws (its randomness is a stream, not keyed by position):
    seeded requests are not compared under those."""
    workload = make_workload(0)
    alone = run(model_dir(family), workload, **PLAIN, **NGRAM)[0]
    batched, stats = run(model_dir(family), workload, **{**PLAIN, **NGRAM, **CONFIGS["prefix-chunked"]})
    assert assert_same_outputs(workload, alone, batched, seeded_too=True) == len(workload)
    assert stats["spec_num_accepted_tokens"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(CONFIGS))
def test_feature_combinations_sweep(family, name, seed, model_dir, plain_outputs):
    check_config(model_dir(family), seed, name, plain_outputs)


# KV offload runs on one device only: TP takes everything else (its ranks are processes, gloo on CPU)
TP_COMBINED = {k: v for k, v in CONFIGS["everything"].items() if k not in ("preemption_mode", *OFFLOAD)}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("combined", [False, True], ids=["tp2", "tp2-combined"])
def test_tensor_parallel_matches_plain(seed, combined, model_dir, plain_outputs):
    extra = TP_COMBINED if combined else {}
    stats = check_config(model_dir("qwen3"), seed, "tp2", plain_outputs, tensor_parallel_size=2, **extra)
    assert stats["num_preemptions"] > 0 or not combined
