"""The config classes of the model types meshserve serves, as transformers (5.x) declares them: each field's
default, in declaration order, its attribute aliases and what its `__post_init__` derives before the base
class's. Read by hf_config.py, which builds configs equal to transformers' own without importing it
(tests/models/test_hf_config.py compares every field with transformers' classes, so a transformers release
that changes a default fails there, not in production).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

# PreTrainedConfig's own dataclass fields, first in every subclass's field order
BASE_FIELDS: dict = {"transformers_version": None, "architectures": None, "output_hidden_states": False,
                     "return_dict": True, "dtype": None, "chunk_size_feed_forward": 0, "is_encoder_decoder": False,
                     "id2label": None, "label2id": None, "problem_type": None}


@dataclass(frozen=True)
class ConfigFamily:
    """One transformers config class: its name, fields (name -> default, declaration order), aliases
    (attribute_map), RoPE theta default and the derivations its __post_init__ makes before the base class's."""

    class_name: str
    model_type: str
    fields: dict
    attribute_map: dict = field(default_factory=dict)
    default_theta: float = 10000.0
    post_init: Callable[[object, dict], None] = None  # type: ignore[assignment]
    # validate_architecture: hidden_size must divide by num_attention_heads
    heads_divide_hidden: bool = False


def _kv_heads_default(c) -> None:
    if c.num_key_value_heads is None:
        c.num_key_value_heads = c.num_attention_heads


def _mixtral_post_init(c, kwargs) -> None:
    _kv_heads_default(c)


def _llama_post_init(c, kwargs) -> None:
    if c.head_dim is None:
        c.head_dim = c.hidden_size // c.num_attention_heads
    _kv_heads_default(c)


def _mistral_post_init(c, kwargs) -> None:
    c.head_dim = c.head_dim if c.head_dim is not None else c.hidden_size // c.num_attention_heads
    _kv_heads_default(c)


def _qwen_dense_post_init(c, kwargs) -> None:  # Qwen2 and Qwen3
    c.sliding_window = c.sliding_window if c.use_sliding_window else None
    _kv_heads_default(c)
    if c.layer_types is None:
        c.layer_types = ["sliding_attention" if c.sliding_window is not None and i >= c.max_window_layers
                         else "full_attention" for i in range(c.num_hidden_layers)]


def _qwen3_moe_post_init(c, kwargs) -> None:
    c.sliding_window = c.sliding_window if c.use_sliding_window else None
    c.mlp_only_layers = [] if c.mlp_only_layers is None else c.mlp_only_layers


def _qwen2_moe_post_init(c, kwargs) -> None:
    c.mlp_only_layers = [] if c.mlp_only_layers is None else c.mlp_only_layers
    c.sliding_window = c.sliding_window if c.use_sliding_window else 0
    if c.layer_types is None:
        c.layer_types = ["sliding_attention" if bool((i + 1) % 2) and i < c.max_window_layers
                         and c.use_sliding_window else "full_attention" for i in range(c.num_hidden_layers)]


def _deepseek_v2_post_init(c, kwargs) -> None:
    c.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    c.head_dim = c.qk_rope_head_dim
    if c.head_dim is None:
        c.head_dim = c.hidden_size // c.num_attention_heads
    _kv_heads_default(c)


def _deepseek_v3_post_init(c, kwargs) -> None:
    _kv_heads_default(c)
    c.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    c.head_dim = c.qk_rope_head_dim


_LLAMA = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
          "max_position_embeddings": 2048, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
          "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2, "pretraining_tp": 1,
          "tie_word_embeddings": False, "rope_parameters": None, "attention_bias": False,
          "attention_dropout": 0.0, "mlp_bias": False, "head_dim": None}

_MISTRAL = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
            "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
            "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "rope_parameters": None, "sliding_window": 4096,
            "attention_dropout": 0.0}

_QWEN2 = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu",
          "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
          "tie_word_embeddings": False, "rope_parameters": None, "use_sliding_window": False,
          "sliding_window": 4096, "max_window_layers": 28, "layer_types": None, "attention_dropout": 0.0,
          "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

_QWEN3 = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
          "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "hidden_act": "silu",
          "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True,
          "tie_word_embeddings": False, "rope_parameters": None, "attention_bias": False,
          "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28, "layer_types": None,
          "attention_dropout": 0.0, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None}

_QWEN3_MOE = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24,
              "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_act": "silu",
              "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
              "use_cache": True, "tie_word_embeddings": False, "rope_parameters": None, "attention_bias": False,
              "use_sliding_window": False, "sliding_window": 4096, "attention_dropout": 0.0,
              "decoder_sparse_step": 1, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
              "num_experts": 128, "norm_topk_prob": False, "output_router_logits": False,
              "router_aux_loss_coef": 0.001, "mlp_only_layers": None, "pad_token_id": None, "bos_token_id": None,
              "eos_token_id": None}

_QWEN2_MOE = {"vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 16, "hidden_act": "silu",
              "max_position_embeddings": 32768, "initializer_range": 0.02, "rms_norm_eps": 1e-6,
              "use_cache": True, "tie_word_embeddings": False, "rope_parameters": None,
              "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28,
              "attention_dropout": 0.0, "decoder_sparse_step": 1, "moe_intermediate_size": 1408,
              "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
              "norm_topk_prob": False, "output_router_logits": False, "router_aux_loss_coef": 0.001,
              "mlp_only_layers": None, "qkv_bias": True, "layer_types": None, "pad_token_id": None,
              "bos_token_id": None, "eos_token_id": None}

_MIXTRAL = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": None, "hidden_act": "silu",
            "max_position_embeddings": 4096 * 32, "initializer_range": 0.02, "rms_norm_eps": 1e-5,
            "use_cache": True, "pad_token_id": None, "bos_token_id": 1, "eos_token_id": 2,
            "tie_word_embeddings": False, "sliding_window": None, "attention_dropout": 0.0,
            "num_experts_per_tok": 2, "num_local_experts": 8, "output_router_logits": False,
            "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "rope_parameters": None}

_DEEPSEEK_V2 = {**_LLAMA, "vocab_size": 102400, "first_k_dense_replace": 0, "kv_lora_rank": 512,
                "q_lora_rank": 1536, "n_group": None, "n_routed_experts": 64, "output_router_logits": False,
                "n_shared_experts": 2, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
                "routed_scaling_factor": 1.0, "topk_group": None, "topk_method": "greedy",
                "norm_topk_prob": False, "v_head_dim": 128, "num_experts_per_tok": None,
                "moe_intermediate_size": 1407}

_DEEPSEEK_V3 = {"vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
                "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
                "num_key_value_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
                "output_router_logits": False, "routed_scaling_factor": 2.5, "kv_lora_rank": 512,
                "q_lora_rank": 1536, "qk_rope_head_dim": 64, "v_head_dim": 128, "qk_nope_head_dim": 128,
                "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8, "first_k_dense_replace": 3,
                "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
                "initializer_range": 0.02, "rms_norm_eps": 1e-6, "use_cache": True, "pad_token_id": None,
                "bos_token_id": 0, "eos_token_id": 1, "pretraining_tp": 1, "tie_word_embeddings": False,
                "rope_parameters": None, "rope_interleave": True, "attention_bias": False,
                "attention_dropout": 0.0, "num_mtp_layers": 1}

FAMILIES: dict[str, ConfigFamily] = {f.model_type: f for f in (
    ConfigFamily("LlamaConfig", "llama", _LLAMA, post_init=_llama_post_init, heads_divide_hidden=True),
    ConfigFamily("MistralConfig", "mistral", _MISTRAL, post_init=_mistral_post_init),
    ConfigFamily("Qwen2Config", "qwen2", _QWEN2, post_init=_qwen_dense_post_init),
    ConfigFamily("Qwen3Config", "qwen3", _QWEN3, post_init=_qwen_dense_post_init),
    ConfigFamily("Qwen3MoeConfig", "qwen3_moe", _QWEN3_MOE, {"num_experts": "num_local_experts"},
                 post_init=_qwen3_moe_post_init),
    ConfigFamily("Qwen2MoeConfig", "qwen2_moe", _QWEN2_MOE, post_init=_qwen2_moe_post_init),
    ConfigFamily("MixtralConfig", "mixtral", _MIXTRAL, {"num_experts": "num_local_experts"},
                 default_theta=1000000.0, post_init=_mixtral_post_init),
    ConfigFamily("DeepseekV2Config", "deepseek_v2", _DEEPSEEK_V2, {"num_experts": "n_routed_experts"},
                 post_init=_deepseek_v2_post_init, heads_divide_hidden=True),
    ConfigFamily("DeepseekV3Config", "deepseek_v3", _DEEPSEEK_V3,
                 {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"},
                 post_init=_deepseek_v3_post_init),
)}

# config.json keys transformers pops as generation parameters (GenerationConfig._get_default_generation_params)
GENERATION_PARAMETERS = frozenset({
    "assistant_confidence_threshold", "assistant_lookbehind", "bad_words_ids", "begin_suppress_tokens",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "encoder_repetition_penalty", "epsilon_cutoff", "eta_cutoff", "exponential_decay_length_penalty",
    "forced_bos_token_id", "forced_eos_token_id", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_assistant_tokens", "num_assistant_tokens_schedule", "num_beam_groups",
    "num_beams", "num_return_sequences", "output_scores", "remove_invalid_values", "repetition_penalty",
    "return_dict_in_generate", "suppress_tokens", "target_lookbehind", "temperature", "top_k", "top_p",
    "typical_p", "use_cache"})
