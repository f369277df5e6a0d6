"""Shared fixtures: tiny random checkpoints of every supported family, written with transformers."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

if not torch.cuda.is_available():
    # Triton picks its interpreter when a kernel is defined, so TRITON_INTERPRET must be set before any module
    # that defines kernels is imported by any test file (a test collected before tests/kernels/ that imported
    # one left every interpreter test failing); the sm_90 compile checks set it back to 0 in their subprocess
    os.environ.setdefault("TRITON_INTERPRET", "1")


def _interpreter_device_calls_patch_once() -> None:
    """Triton 3.9's interpreter re-patches triton.language (inspect.getmembers over tl, tl.core, tl.math, ...) at
    every call of a @triton.jit helper inside a kernel, never restoring it: ~a third of every interpreter test's
    time. The launch's own patch stays as it is; a helper's call now patches only when a language module that
    its globals hold is not patched yet (its `load` is still the builtin), which is the one case where the
    re-patch changed anything (the values it sets are the same functions again). Triton 3.9 only: on any other
    version, or with MESHSERVE_TEST_INTERPRETER_AS_SHIPPED=1, the interpreter runs as shipped."""
    import importlib.util
    import inspect

    if os.environ.get("TRITON_INTERPRET") != "1" or importlib.util.find_spec("triton") is None:
        return
    import triton

    if not triton.__version__.startswith("3.9.") or os.environ.get("MESHSERVE_TEST_INTERPRETER_AS_SHIPPED") == "1":
        return
    import triton.language as tl
    from triton.runtime import interpreter

    langs_of: dict = {}

    def __call__(self, *args, **kwargs):  # InterpretedFunction.__call__ (a device function call), as shipped
        langs = langs_of.get(self.fn)
        if langs is None:  # what _patch_lang patches for this function: tl / tl.core where its module holds them
            langs = langs_of[self.fn] = [v for v in self.fn.__globals__.values()
                                         if inspect.ismodule(v) and v in (tl, tl.core)]
        if not langs or any(tl.core.is_builtin(lang.load) for lang in langs):
            interpreter._patch_lang(self.fn)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    interpreter.InterpretedFunction.__call__ = __call__


_interpreter_device_calls_patch_once()

VOCAB = 320

FAMILIES: dict[str, dict] = {
    "llama": dict(model_type="llama", tie_word_embeddings=False),
    "llama31": dict(model_type="llama", tie_word_embeddings=True,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=24),
    # mixture of experts: Mixtral (every layer sparse, top-2 of 4) and Qwen3-MoE (top-4 of 8, layer 1 dense)
    "mixtral": dict(model_type="mixtral", tie_word_embeddings=False, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", tie_word_embeddings=False, head_dim=24, num_experts=8,
                      num_experts_per_tok=4, moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=1,
                      mlp_only_layers=[1]),
    # Qwen2-MoE: a gated shared expert beside the routed ones, QKV bias, top-2 of 8 not renormalized
    "qwen2_moe": dict(model_type="qwen2_moe", tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2,
                      moe_intermediate_size=32, shared_expert_intermediate_size=64, norm_topk_prob=False),
    # DeepSeek MLA (one KV head per query head in HF's view): V2 without q_lora_rank, group-limited greedy
    # softmax routing, 2 shared experts, YaRN; V3 with q_lora_rank, sigmoid + correction bias (randomized
    # below) group-limited top-2, renormalized and scaled, YaRN with an mscale != mscale_all_dim
    "deepseek_v2": {"model_type": "deepseek_v2", "tie_word_embeddings": False, "num_key_value_heads": 4,
                    "q_lora_rank": None, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 24, "n_routed_experts": 8, "n_group": 4, "topk_group": 2,
                    "topk_method": "group_limited_greedy", "num_experts_per_tok": 3, "n_shared_experts": 2,
                    "moe_intermediate_size": 16, "first_k_dense_replace": 1, "routed_scaling_factor": 1.5,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707,
                                     "original_max_position_embeddings": 128}},
    "deepseek_v3": {"model_type": "deepseek_v3", "tie_word_embeddings": False, "num_key_value_heads": 4,
                    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                    "v_head_dim": 16, "n_routed_experts": 8, "n_group": 4, "topk_group": 2, "num_experts_per_tok": 2,
                    "n_shared_experts": 1, "moe_intermediate_size": 24, "first_k_dense_replace": 1,
                    "routed_scaling_factor": 2.5, "norm_topk_prob": True,
                    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.8,
                                     "original_max_position_embeddings": 128, "beta_fast": 32, "beta_slow": 1}},
}


def _train_tokenizer(vocab_size: int):
    """A small byte-level BPE tokenizer with a chat template, trained offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["The capital of France is Paris.", "Hello world, how are you today?",
              "User: hi\nAssistant: hello there", "numbers 0123456789 and café, naïve, 東京 🙂"] * 20
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                         "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def make_tiny_checkpoint(path: str, family: str, seed: int = 0, with_tokenizer: bool = True,
                         max_shard_size: str | None = None, **overrides) -> str:
    """A tiny random checkpoint of `family`; `overrides` change its config fields (e.g. num_key_value_heads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**FAMILIES[family], **overrides}
    model_type = fields.pop("model_type")
    base = {"vocab_size": VOCAB, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
            "initializer_range": 0.2, "bos_token_id": 0, "eos_token_id": 2}
    config = AutoConfig.for_model(model_type, **{**base, **fields})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float().eval()
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias"):  # zeros at init: make it steer the routing
            buf.normal_(0.0, 0.1)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    if with_tokenizer:
        _train_tokenizer(VOCAB).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Returns a function family -> folder of a tiny random checkpoint (cached per session)."""
    cache: dict[str, str] = {}

    def get(family: str = "llama") -> str:
        if family not in cache:
            path = str(tmp_path_factory.mktemp(f"tiny-{family}"))
            cache[family] = make_tiny_checkpoint(path, family)
        return cache[family]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """family folder -> the transformers model loaded from it (cached)."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def get(path: str):
        if path not in cache:
            cache[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


@pytest.fixture(autouse=True, scope="session")
def _threads():
    # CI has 2 cores; keep torch from oversubscribing them when pytest-xdist is not used
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="module")
def greedy_model(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model whose generation_config.json recommends greedy decoding and 5 new tokens."""
    folder = tmp_path_factory.mktemp("generation-defaults") / "model"
    shutil.copytree(tiny_model_dir("llama"), folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 2, "temperature": 0.0, "max_new_tokens": 5}))
    return str(folder)
