"""The config.json fields the planner needs for well-known models, so `meshserve plan NAME` works offline.

Values are copied from each model's published config.json. The planner keeps its own table (rather than
meshserve.models.presets) because that module imports transformers, and the planner must stay light.
"""

from __future__ import annotations

_LLAMA31 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False,
                torch_dtype="bfloat16")
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
              torch_dtype="bfloat16")

PLANNER_PRESETS: dict[str, dict] = {
    "llama-3.1-8b": dict(_LLAMA31, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8),
    "llama-3.1-70b": dict(_LLAMA31, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                          num_attention_heads=64, num_key_value_heads=8),
    "llama-3.1-405b": dict(_LLAMA31, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                           num_attention_heads=128, num_key_value_heads=8),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-32b": dict(_QWEN3, hidden_size=5120, intermediate_size=25600, num_hidden_layers=64,
                      num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(_QWEN3, model_type="qwen3_moe", hidden_size=2048, intermediate_size=6144,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4,
                          tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8,
                          moe_intermediate_size=768, decoder_sparse_step=1, mlp_only_layers=[]),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
                       torch_dtype="bfloat16"),  # v0.3
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
                         num_local_experts=8, num_experts_per_tok=2, torch_dtype="bfloat16"),
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, tie_word_embeddings=True, torch_dtype="bfloat16"),
}

# Other spellings people type for the same checkpoints.
ALIASES: dict[str, str] = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "meta-llama/llama-3.1-405b": "llama-3.1-405b", "meta-llama/llama-3.1-405b-instruct": "llama-3.1-405b",
    "qwen/qwen3-0.6b": "qwen3-0.6b", "qwen/qwen3-8b": "qwen3-8b", "qwen/qwen3-32b": "qwen3-32b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b", "mistralai/mistral-7b-v0.3": "mistral-7b",
    "mistralai/mistral-7b-instruct-v0.3": "mistral-7b", "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
}


def planner_preset(name: str) -> dict | None:
    """The config.json fields of a preset or a known HF repo id (case-insensitive), or None."""
    key = name.lower()
    key = ALIASES.get(key, key)
    fields = PLANNER_PRESETS.get(key)
    return dict(fields) if fields is not None else None
