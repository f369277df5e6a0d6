"""Named architecture presets for `--load-format dummy` (benchmarks at real sizes without downloads).

The values are the published config.json fields of each model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PretrainedConfig

_LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192}

_LLAMA31_COMMON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 128256,
                   "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                   "rope_scaling": _LLAMA31_ROPE, "tie_word_embeddings": False, "bos_token_id": 128000,
                   "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu", "torch_dtype": "bfloat16"}

PRESETS: dict[str, dict] = {
    "llama-3.1-8b": {**_LLAMA31_COMMON, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8},
    "llama-3.1-70b": {**_LLAMA31_COMMON, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
                      "num_attention_heads": 64, "num_key_value_heads": 8},
    "llama-3.1-405b": {**_LLAMA31_COMMON, "hidden_size": 16384, "intermediate_size": 53248,
                       "num_hidden_layers": 126, "num_attention_heads": 128, "num_key_value_heads": 8},
    "qwen3-0.6b": {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": 151936,
                   "hidden_size": 1024, "intermediate_size": 3072, "num_hidden_layers": 28,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
                   "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                   "tie_word_embeddings": True, "bos_token_id": 151643, "eos_token_id": 151645,
                   "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "smollm2-135m": {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
                     "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
                     "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "torch_dtype": "bfloat16"},
}


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_config(name: str) -> PretrainedConfig:
    """A transformers config object for a preset name (case-insensitive)."""
    from transformers import AutoConfig  # here, not at import: the preset table is read before torch loads

    fields = dict(PRESETS[name.lower()])
    model_type = fields.pop("model_type")
    return AutoConfig.for_model(model_type, **fields)
