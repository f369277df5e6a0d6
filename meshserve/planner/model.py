"""A model's shapes (from any HF config.json or a preset) and its parameter counts, MoE-aware.

Counts come from the tensor shapes of a Llama-style decoder (Llama, Mistral, Qwen2/3, Mixtral, Qwen3-MoE):
embedding, per layer q/k/v/o projections (GQA: k and v have num_kv_heads × head_dim outputs), a gated MLP
(gate, up, down) or a set of experts plus a router, two RMSNorms per layer, a final norm and the LM head
(absent when tied to the embedding). DeepSeek's multi-head latent attention (MLA, kv_lora_rank set) replaces
q/k/v with q_a/q_b (or q), kv_a (to the latent and the shared rotary key) and kv_b (latent to per-head k_nope
and v); its KV cache holds one latent + rotary key per token and layer, whatever the head count.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from meshserve.errors import InvalidArgumentError
from meshserve.models.presets import PRESETS, find_preset, preset_names  # a plain table: no torch


@dataclass(frozen=True)
class ModelSpec:
    """The shapes that decide memory and speed. MoE fields are zero for dense models."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    max_position_embeddings: int
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_moe_layers: int = 0
    # which layers are MoE (DeepSeek's first_k_dense_replace, Qwen2-MoE's mlp_only_layers leave some dense);
    # empty: the last num_moe_layers
    moe_layer_ids: tuple[int, ...] = ()
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    checkpoint_dtype: str = "bf16"  # what the checkpoint stores: bf16, fp8, int8 or int4
    # multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank 0 means ordinary attention
    kv_lora_rank: int = 0
    q_lora_rank: int = 0  # 0: q projected straight from hidden
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    # ---- per-layer pieces (parameters) ----
    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def mla_replicated_params(self) -> int:
        """MLA's projections every TP rank holds whole: q_a (hidden → q_lora_rank) and kv_a (hidden → latent +
        rotary key)."""
        if not self.is_mla:
            return 0
        return self.hidden_size * (self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim)

    @property
    def q_params(self) -> int:
        if self.is_mla:
            qk = self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            return (self.hidden_size * self.q_lora_rank + self.q_lora_rank * qk if self.q_lora_rank
                    else self.hidden_size * qk)
        return self.hidden_size * self.num_heads * self.head_dim

    @property
    def kv_params(self) -> int:
        """k_proj + v_proj: each maps hidden → num_kv_heads × head_dim (GQA). MLA: kv_a (hidden → latent +
        rotary key) and kv_b (latent → per-head k_nope and v)."""
        if self.is_mla:
            return (self.hidden_size * (self.kv_lora_rank + self.qk_rope_head_dim)
                    + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim))
        return 2 * self.hidden_size * self.num_kv_heads * self.head_dim

    @property
    def o_params(self) -> int:
        return self.num_heads * (self.v_head_dim if self.is_mla else self.head_dim) * self.hidden_size

    @property
    def attn_bias_params(self) -> int:
        if not self.attention_bias:
            return 0
        if self.is_mla:  # q_a, kv_a and o carry the biases
            return self.q_lora_rank + self.kv_lora_rank + self.qk_rope_head_dim + self.hidden_size
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    @property
    def kv_elements_per_token_layer(self) -> int:
        """Numbers cached per token per layer: K and V of every KV head, or MLA's latent + rotary key."""
        if self.is_mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    @property
    def attn_params(self) -> int:
        return self.q_params + self.kv_params + self.o_params + self.attn_bias_params

    @property
    def dense_mlp_params(self) -> int:
        return 3 * self.hidden_size * self.intermediate_size  # gate, up, down

    @property
    def expert_params(self) -> int:
        """One routed expert (gate, up, down of moe_intermediate_size)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        return 3 * self.hidden_size * self.shared_expert_intermediate_size

    @property
    def router_params(self) -> int:
        return self.hidden_size * self.num_experts

    @property
    def norm_params_per_layer(self) -> int:
        mla_norms = self.q_lora_rank + self.kv_lora_rank  # q_a_layernorm, kv_a_layernorm
        return 2 * self.hidden_size + (2 * self.head_dim if self.qk_norm else 0) + mla_norms

    @property
    def num_dense_layers(self) -> int:
        return self.num_layers - self.num_moe_layers

    def moe_layers_in(self, start: int, end: int) -> int:
        """MoE layers among layers [start, end): a pipeline stage's count, not its proportional share (DeepSeek-V3's
        3 dense layers all sit on the first stage)."""
        ids = self.moe_layer_ids or range(self.num_layers - self.num_moe_layers, self.num_layers)
        return sum(1 for i in ids if start <= i < end)

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    # ---- totals ----
    def _layer_params(self, experts: int) -> int:
        dense = self.num_dense_layers * self.dense_mlp_params
        moe = self.num_moe_layers * (experts * self.expert_params + self.shared_expert_params + self.router_params)
        return self.num_layers * (self.attn_params + self.norm_params_per_layer) + dense + moe

    @property
    def total_params(self) -> int:
        """Every parameter stored (all experts)."""
        return (self.embedding_params + self.lm_head_params + self.hidden_size
                + self._layer_params(self.num_experts))

    @property
    def active_params(self) -> int:
        """Parameters one token touches (top-k experts of each MoE layer); equals total for dense models."""
        return (self.embedding_params + self.lm_head_params + self.hidden_size
                + self._layer_params(self.experts_per_token))

    @property
    def head_matmul_params(self) -> int:
        """The LM head's GEMM per sampled token, tied to the embedding or not (the embedding itself is a lookup)."""
        return self.vocab_size * self.hidden_size

    @property
    def body_matmul_params(self) -> int:
        """Weights every token multiplies by in the layers: active parameters without embedding and head."""
        return self.active_params - self.embedding_params - self.lm_head_params

    @property
    def linear_params(self) -> int:
        """Parameters of the quantizable linear layers (projections and experts; not embedding/head/norms)."""
        dense = self.num_dense_layers * self.dense_mlp_params
        moe = self.num_moe_layers * (self.num_experts * self.expert_params + self.shared_expert_params)
        return self.num_layers * (self.q_params + self.kv_params + self.o_params) + dense + moe


_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "bf16", "fp16": "bf16", "float32": "bf16", "bf16": "bf16"}


def _checkpoint_dtype(cfg: dict) -> str:
    q = cfg.get("quantization_config") or {}
    method = str(q.get("quant_method", "")).lower()
    if method == "fp8" or (method == "compressed-tensors" and "float" in json.dumps(q).lower()):
        return "fp8"
    bits = q.get("bits") or q.get("w_bit")
    if bits == 4 or method == "awq":
        return "int4"
    if bits == 8:
        return "int8"
    return _DTYPE_NAMES.get(str(cfg.get("torch_dtype", "bfloat16")), "bf16")


def model_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """A ModelSpec from the fields of an HF config.json (Llama-style decoders, dense or MoE)."""
    if "text_config" in cfg and "hidden_size" not in cfg:
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
    try:
        hidden = int(cfg["hidden_size"])
        heads = int(cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
        vocab = int(cfg["vocab_size"])
    except KeyError as e:
        raise InvalidArgumentError(f"{name}: config.json lacks a usable field {e}") from e
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"{name}: config.json has a field that is not a whole number ({e})") from e
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", layers),
                       ("vocab_size", vocab)):
        if value < 1:  # 0 divides by zero in the head dimension and every per-layer figure
            raise InvalidArgumentError(f"{name}: config.json's {key} must be >= 1, got {value}")
    model_type = str(cfg.get("model_type", ""))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    mla = int(cfg.get("kv_lora_rank") or 0)
    nope, rope, v_dim = (int(cfg.get(k) or 0) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if mla:
        head_dim = nope + rope  # the query/key width per head (what the attention FLOPs scale with)
        kv_heads = heads
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts") or 0)
    moe_ids: tuple[int, ...] = ()
    if experts:
        step = int(cfg.get("decoder_sparse_step") or 1)
        dense_only = set(cfg.get("mlp_only_layers") or [])
        first_dense = int(cfg.get("first_k_dense_replace") or 0)
        moe_ids = tuple(i for i in range(layers)
                        if i not in dense_only and i >= first_dense and (i + 1) % step == 0)
    window = cfg.get("sliding_window")
    use_window = isinstance(window, int) and cfg.get("use_sliding_window", True) and window < int(
        cfg.get("max_position_embeddings") or 1 << 30)
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        # HF's default for tie_word_embeddings is True; Llama-style configs state it when False.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        num_experts=experts,
        experts_per_token=int(cfg.get("num_experts_per_tok") or 0) if experts else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg.get("intermediate_size") or 0)
        if experts else 0,
        shared_expert_intermediate_size=(int(cfg.get("shared_expert_intermediate_size") or 0)  # Qwen2-MoE
                                         or int(cfg.get("n_shared_experts") or 0)  # DeepSeek
                                         * int(cfg.get("moe_intermediate_size") or 0)) if experts else 0,
        num_moe_layers=len(moe_ids),
        moe_layer_ids=moe_ids,
        attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        qk_norm=model_type.startswith("qwen3"),
        sliding_window=int(window) if use_window else None,
        checkpoint_dtype=_checkpoint_dtype(cfg),
        kv_lora_rank=mla,
        q_lora_rank=int(cfg.get("q_lora_rank") or 0) if mla else 0,
        qk_nope_head_dim=nope if mla else 0,
        qk_rope_head_dim=rope if mla else 0,
        v_head_dim=v_dim if mla else 0,
    )


def load_model(name_or_path: str) -> ModelSpec:
    """A config.json path or a folder holding one, else a preset name or an HF repo id of one."""
    path = Path(name_or_path)
    config = path / "config.json" if path.is_dir() else path
    if config.is_file():
        try:
            cfg = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise InvalidArgumentError(f"{config}: not valid JSON: {e}", param="model") from e
        return model_from_config(cfg, name=config.parent.name or str(config))
    preset = find_preset(name_or_path)
    if preset is None:
        raise InvalidArgumentError(f"model {name_or_path!r} is neither a preset ({', '.join(preset_names())}), "
                                   "an HF id of one, nor a config.json path", param="model")
    # An HF id keeps its spelling in the report; a preset name is shown as listed.
    name = preset if name_or_path.lower() == preset else name_or_path
    return model_from_config(dict(PRESETS[preset]), name=name)
