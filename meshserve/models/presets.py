"""Named model presets: the published config.json fields of well-known models, and their HF repo ids.

One table serves `generate/serve/bench --load-format dummy` (real sizes, random weights, no download) and
`meshserve plan` (shapes only). It imports nothing heavy at module level, so the planner can read it without
torch or transformers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

_LLAMA31 = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
            "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False, "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "torch_dtype": "bfloat16"}

_QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936, "head_dim": 128,
          "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "bos_token_id": 151643,
          "eos_token_id": 151645, "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False}

_MISTRAL = {"vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 32768,
            "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False,
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "bfloat16"}

# DeepSeek: MLA (kv_lora_rank latent + qk_rope_head_dim rotary key cached per token), YaRN x40 from 4k
_DEEPSEEK_YARN = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                  "original_max_position_embeddings": 4096}
_DEEPSEEK = {"max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "rope_theta": 10000, "kv_lora_rank": 512,
             "qk_rope_head_dim": 64, "qk_nope_head_dim": 128, "v_head_dim": 128, "moe_layer_freq": 1,
             "first_k_dense_replace": 1, "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": "bfloat16",
             "attention_bias": False}

PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {**_LLAMA31, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA31, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3.1-405b": {**_LLAMA31, "hidden_size": 16384, "intermediate_size": 53248, "num_hidden_layers": 126,
                       "num_attention_heads": 128, "num_key_value_heads": 8},
    "qwen3-0.6b": {**_QWEN3, "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "tie_word_embeddings": True},
    "qwen3-8b": {**_QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
                 "num_attention_heads": 32, "num_key_value_heads": 8},
    "qwen3-32b": {**_QWEN3, "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 64,
                  "num_attention_heads": 64, "num_key_value_heads": 8},
    "qwen3-30b-a3b": {**_QWEN3, "model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                      "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
                      "num_attention_heads": 32, "num_key_value_heads": 4, "num_experts": 128,
                      "num_experts_per_tok": 8, "moe_intermediate_size": 768, "decoder_sparse_step": 1,
                      "mlp_only_layers": [], "norm_topk_prob": True},
    "mistral-7b": {**_MISTRAL, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                   "head_dim": 128},  # v0.3
    "mixtral-8x7b": {**_MISTRAL, "model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
                     "vocab_size": 32000, "num_local_experts": 8, "num_experts_per_tok": 2},
    # 15.7 B total, 2.4 B active; q straight from hidden (no q_lora_rank); softmax greedy top-6 of 64 + 2 shared
    "deepseek-v2-lite": {**_DEEPSEEK, "model_type": "deepseek_v2", "architectures": ["DeepseekV2ForCausalLM"],
                         "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
                         "num_key_value_heads": 16, "n_shared_experts": 2, "n_routed_experts": 64,
                         "num_experts_per_tok": 6, "routed_scaling_factor": 1.0, "topk_method": "greedy",
                         "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "q_lora_rank": None,
                         "rope_scaling": {**_DEEPSEEK_YARN, "mscale": 0.707, "mscale_all_dim": 0.707},
                         "bos_token_id": 100000, "eos_token_id": 100001},
    # 671 B total, 37 B active; released as block-wise FP8 (128 x 128 weight scales): the planner counts 1 B per
    # linear weight; sigmoid routing with a correction bias, top-8 of 256 within the best 4 of 8 groups
    "deepseek-v3": {**_DEEPSEEK, "model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                    "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                    "num_experts_per_tok": 8, "routed_scaling_factor": 2.5, "topk_method": "noaux_tc",
                    "n_group": 8, "topk_group": 4, "norm_topk_prob": True, "q_lora_rank": 1536,
                    "first_k_dense_replace": 3, "num_nextn_predict_layers": 1,
                    "rope_scaling": {**_DEEPSEEK_YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
                    "bos_token_id": 0, "eos_token_id": 1,
                    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                            "weight_block_size": [128, 128]}},
    "smollm2-135m": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                     "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "bfloat16"},
}

# HF repo ids with the same architecture as each preset (base and instruct share the shapes).
HF_IDS: dict[str, tuple[str, ...]] = {
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct",
                     "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-8B-Instruct"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct",
                      "meta-llama/Meta-Llama-3.1-70B", "meta-llama/Meta-Llama-3.1-70B-Instruct"),
    "llama-3.1-405b": ("meta-llama/Llama-3.1-405B", "meta-llama/Llama-3.1-405B-Instruct",
                       "meta-llama/Meta-Llama-3.1-405B", "meta-llama/Meta-Llama-3.1-405B-Instruct"),
    "qwen3-0.6b": ("Qwen/Qwen3-0.6B",),
    "qwen3-8b": ("Qwen/Qwen3-8B",),
    "qwen3-32b": ("Qwen/Qwen3-32B",),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B",),
    "mistral-7b": ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    "deepseek-v2-lite": ("deepseek-ai/DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite-Chat"),
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", "deepseek-ai/DeepSeek-V3-Base", "deepseek-ai/DeepSeek-V3-0324",
                    "deepseek-ai/DeepSeek-R1", "deepseek-ai/DeepSeek-R1-0528"),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # the embedded model
}

# Lower-cased HF id, with and without its organisation ("smollm2-135m-instruct"), to preset name.
_BY_HF_ID: dict[str, str] = {key: name for name, ids in HF_IDS.items() for hf in ids
                             for key in (hf.lower(), hf.split("/")[-1].lower())}


def preset_names() -> list[str]:
    return list(PRESETS)


def find_preset(name: str) -> str | None:
    """The preset a name or HF repo id (case-insensitive, organisation optional) stands for, or None."""
    key = name.lower()
    return key if key in PRESETS else _BY_HF_ID.get(key)


def preset_config(name: str) -> PretrainedConfig:
    """The config (transformers' fields, models/hf_config.py) of a preset name or one of its HF ids
    (case-insensitive)."""
    from meshserve.models.hf_config import config_for_model  # here: the preset table is read before torch loads

    fields = dict(PRESETS[find_preset(name) or name.lower()])
    model_type = fields.pop("model_type")
    return config_for_model(model_type, fields)
