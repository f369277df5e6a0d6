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
import math
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

    def matmul_flops(self, tokens: float, sampled: float) -> float:
        """The GEMM FLOPs of `tokens` through the layers, `sampled` of them also through the LM head (a prompt's
        last token, every decoded one); attention's own left out."""
        return 2 * (self.body_matmul_params * tokens + self.head_matmul_params * sampled)

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


_MAX_FIELD = 1 << 31  # past any real shape; 1e30 printed a 1e53-parameter "no fit"


def _whole(cfg: dict, key: str, name: str, default: int = 0) -> int:
    """cfg[key] as a whole number >= 0, `default` when absent, null or 0 (HF's "unset"); anything else (a string,
    a fraction, NaN, a negative or absurd size) is one line naming the field, not a traceback or a plan of
    negative bytes."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not -math.inf < value < math.inf \
            or value != int(value):
        raise InvalidArgumentError(f"{name}: config.json's {key} must be a whole number, got {value!r}",
                                   param="model")
    if value < 0:
        raise InvalidArgumentError(f"{name}: config.json's {key} must be >= 0, got {value!r}", param="model")
    if value >= _MAX_FIELD:
        raise InvalidArgumentError(f"{name}: config.json's {key} of {value:,} is past any model's (at most "
                                   f"{_MAX_FIELD - 1:,})", param="model")
    return int(value) or default


def model_from_config(cfg: dict, name: str = "model") -> ModelSpec:
    """A ModelSpec from the fields of an HF config.json (Llama-style decoders, dense or MoE)."""
    def bad(what: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"{name}: config.json's {what}", param="model")

    if not isinstance(cfg, dict):
        raise InvalidArgumentError(f"{name}: config.json must be a JSON object of fields, got "
                                   f"{type(cfg).__name__}", param="model")
    if "text_config" in cfg and "hidden_size" not in cfg:
        if not isinstance(cfg["text_config"], dict):
            raise bad(f"text_config must be an object, got {type(cfg['text_config']).__name__}")
        cfg = {**cfg["text_config"], "quantization_config": cfg.get("quantization_config")}
    for key in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if cfg.get(key) is None:
            raise InvalidArgumentError(f"{name}: config.json lacks a usable field '{key}'", param="model")
    hidden, heads, layers, vocab = (_whole(cfg, k, name) for k in ("hidden_size", "num_attention_heads",
                                                                    "num_hidden_layers", "vocab_size"))
    for key, value in (("hidden_size", hidden), ("num_attention_heads", heads), ("num_hidden_layers", layers),
                       ("vocab_size", vocab)):
        if value < 1:  # 0 divides by zero in the head dimension and every per-layer figure
            raise bad(f"{key} must be >= 1, got {value}")
    for key in ("quantization_config", "rope_scaling"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise bad(f"{key} must be an object, got {cfg[key]!r}")
    for key in ("tie_word_embeddings", "attention_bias", "use_sliding_window"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(f"{key} must be true or false, got {cfg[key]!r}")
    model_type = str(cfg.get("model_type", ""))
    kv_heads = _whole(cfg, "num_key_value_heads", name, heads)
    head_dim = _whole(cfg, "head_dim", name, hidden // heads)
    mla = _whole(cfg, "kv_lora_rank", name)
    nope, rope, v_dim = (_whole(cfg, k, name) for k in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"))
    if mla:
        if nope + rope < 1 or v_dim < 1:
            raise bad(f"MLA (kv_lora_rank {mla}) needs qk_nope_head_dim + qk_rope_head_dim >= 1 and v_head_dim >= 1, "
                      f"got {nope} + {rope} and {v_dim}")
        head_dim = nope + rope  # the query/key width per head (what the attention FLOPs scale with)
        kv_heads = heads
    elif heads % kv_heads:  # GQA: every KV head serves the same number of query heads (as the engine's layers)
        raise bad(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    if head_dim < 1:
        raise bad(f"head_dim must be >= 1, got {head_dim} (hidden_size {hidden} / {heads} heads)")
    experts = (_whole(cfg, "num_local_experts", name) or _whole(cfg, "num_experts", name)
               or _whole(cfg, "n_routed_experts", name))
    top_k = _whole(cfg, "num_experts_per_tok", name) if experts else 0
    if experts and not 1 <= top_k <= experts:
        raise bad(f"num_experts_per_tok must be 1 to its {experts} experts, got {top_k}")
    moe_ids: tuple[int, ...] = ()
    if experts:
        step = _whole(cfg, "decoder_sparse_step", name, 1)
        dense_only = cfg.get("mlp_only_layers") or []
        if not isinstance(dense_only, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                                       for i in dense_only):
            raise bad(f"mlp_only_layers must be a list of layer indices, got {dense_only!r}")
        first_dense = _whole(cfg, "first_k_dense_replace", name)
        moe_ids = tuple(i for i in range(layers)
                        if i not in set(dense_only) and i >= first_dense and (i + 1) % step == 0)
    max_pos = _whole(cfg, "max_position_embeddings", name, 4096)
    intermediate = _whole(cfg, "intermediate_size", name, 4 * hidden)
    moe_inter = _whole(cfg, "moe_intermediate_size", name) or _whole(cfg, "intermediate_size", name)
    if experts and moe_inter < 1:
        raise bad(f"moe_intermediate_size must be >= 1 for its {experts} experts, got {moe_inter}")
    if cfg.get("sliding_window") is not None and not isinstance(cfg["sliding_window"], bool):
        _whole(cfg, "sliding_window", name)  # a negative window held negative tokens: -178,753 concurrent
    window = cfg.get("sliding_window")
    use_window = isinstance(window, int) and not isinstance(window, bool) and window >= 1 and cfg.get(
        "use_sliding_window", True) and window < max_pos
    return ModelSpec(
        name=name,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        # HF's default for tie_word_embeddings is True; Llama-style configs state it when False.
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        max_position_embeddings=max_pos,
        num_experts=experts,
        experts_per_token=top_k,
        moe_intermediate_size=moe_inter if experts else 0,
        shared_expert_intermediate_size=(_whole(cfg, "shared_expert_intermediate_size", name)  # Qwen2-MoE
                                         or _whole(cfg, "n_shared_experts", name)  # DeepSeek
                                         * _whole(cfg, "moe_intermediate_size", name)) if experts else 0,
        num_moe_layers=len(moe_ids),
        moe_layer_ids=moe_ids,
        attention_bias=bool(cfg.get("attention_bias", model_type in ("qwen2", "qwen2_moe"))),
        qk_norm=model_type.startswith("qwen3"),
        sliding_window=int(window) if use_window else None,
        checkpoint_dtype=_checkpoint_dtype(cfg),
        kv_lora_rank=mla,
        q_lora_rank=_whole(cfg, "q_lora_rank", name) if mla else 0,
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
    if preset is None and path.is_dir():  # said it was no preset: the folder was found, its config.json not
        raise InvalidArgumentError(f"model {name_or_path!r}: the folder has no config.json", param="model")
    if preset is None:
        raise InvalidArgumentError(f"model {name_or_path!r} is neither a preset ({', '.join(preset_names())}), "
                                   "an HF id of one, nor a config.json path", param="model")
    # An HF id keeps its spelling in the report; a preset name is shown as listed.
    name = preset if name_or_path.lower() == preset else name_or_path
    return model_from_config(dict(PRESETS[preset]), name=name)
