"""The checkpoint tensor names and shapes of the dense decoder families (Llama, Mistral, Qwen2, Qwen3), from
their config alone.

Dummy weights are drawn at the checkpoint's full shapes (loader.checkpoint_shapes). Deriving them from the HF
model class on the meta device imports transformers' modeling code (seconds of a cold start, the disk cache in
shapes_cache.py being empty on a fresh machine); for these families the names and shapes follow from a few
config fields, listed here in the order transformers' state_dict gives them. Other families (MoE, MLA) keep
the HF class. tests/models/test_dense_shapes.py compares both for every preset and tiny config.
"""

from __future__ import annotations

_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def dense_checkpoint_shapes(hf_config) -> dict[str, tuple[int, ...]] | None:
    """{tensor name: shape} as transformers' `AutoModelForCausalLM.from_config(hf_config).state_dict()` has
    them, or None for a model type not listed here."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in _FAMILIES:
        return None
    c = hf_config
    hidden, vocab, inter = c.hidden_size, c.vocab_size, c.intermediate_size
    head_dim = getattr(c, "head_dim", None) or hidden // c.num_attention_heads
    q_out, kv_out = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    # which projections carry a bias: Qwen2 q/k/v always; Llama and Qwen3 all four with attention_bias
    qkv_bias = model_type == "qwen2" or (model_type in ("llama", "qwen3") and c.attention_bias)
    o_bias = model_type in ("llama", "qwen3") and c.attention_bias
    mlp_bias = model_type == "llama" and c.mlp_bias

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}

    def linear(name: str, out_features: int, in_features: int, bias: bool) -> None:
        shapes[f"{name}.weight"] = (out_features, in_features)
        if bias:
            shapes[f"{name}.bias"] = (out_features,)

    for i in range(c.num_hidden_layers):
        layer = f"model.layers.{i}"
        linear(f"{layer}.self_attn.q_proj", q_out, hidden, qkv_bias)
        linear(f"{layer}.self_attn.k_proj", kv_out, hidden, qkv_bias)
        linear(f"{layer}.self_attn.v_proj", kv_out, hidden, qkv_bias)
        linear(f"{layer}.self_attn.o_proj", hidden, q_out, o_bias)
        if model_type == "qwen3":
            shapes[f"{layer}.self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{layer}.self_attn.k_norm.weight"] = (head_dim,)
        linear(f"{layer}.mlp.gate_proj", inter, hidden, mlp_bias)
        linear(f"{layer}.mlp.up_proj", inter, hidden, mlp_bias)
        linear(f"{layer}.mlp.down_proj", hidden, inter, mlp_bias)
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)  # in the state_dict even when tied to the embedding
    return shapes
