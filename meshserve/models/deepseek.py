"""DeepSeek-V2 and DeepSeek-V3: multi-head latent attention (MLA) and shared + routed experts with grouped
routing, on the Llama skeleton (embedding, RMSNorm residual stream, LM head, pipeline stages, loading).

Attention (HF DeepseekV2/V3Attention): q from hidden (q_proj) or through a low-rank bottleneck (q_a_proj ->
RMSNorm -> q_b_proj, when q_lora_rank is set), split per head into a no-position part (qk_nope_head_dim) and
a rotary part (qk_rope_head_dim); kv_a_proj_with_mqa gives one latent (kv_lora_rank, RMSNormed) and one
rotary key shared by all heads; kv_b_proj expands the latent to per-head k_nope and v. The cache keeps only
the latent and the rotary key (layers/mla_attention.py). DeepSeek rotates interleaved pairs (V2 always, V3
unless rope_interleave is false); the softmax scale carries YaRN's mscale(factor, mscale_all_dim)^2.

MoE: the first first_k_dense_replace layers are dense; the others route each token to top-k of
n_routed_experts (layers/moe_routing.GroupedTopK: V3 sigmoid + correction bias + group-limited top-k; V2
softmax greedy or group_limited_greedy) times routed_scaling_factor, plus n_shared_experts always-on experts
(one MLP of n_shared_experts x moe_intermediate_size). The router runs in float32, as in HF.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.fused_moe import FusedMoE
from meshserve.layers.linear import (
    ColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedColumnParallelLinear,
)
from meshserve.layers.mla_attention import MLAAttention
from meshserve.layers.moe_routing import GroupedTopK
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding
from meshserve.models.llama import LlamaMLP
from meshserve.models.moe import MoeForCausalLM
from meshserve.models.moe_config import expert_intermediate_size, is_sparse_layer, num_experts


def _yarn_mscale(scale: float, mscale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def mla_softmax_scale(hf_config) -> float:
    """1/sqrt(qk_head_dim), times mscale^2 under YaRN scaling with mscale_all_dim (HF yarn_apply_mscale)."""
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default" and params.get("mscale_all_dim"):
        m = _yarn_mscale(float(params["factor"]), float(params["mscale_all_dim"]))
        scale *= m * m
    return scale


def apply_deepseek_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [T, h, P]; cos/sin [T, P] in rotate-half layout (cat(freqs, freqs)). Interleaved: pairs (x0, x1),
    (x2, x3), ... each rotated by one frequency, the result laid out as [rotated evens, rotated odds] (HF V3's
    apply_rotary_pos_emb_interleave; V2's complex form keeps the pairs in place, a permutation applied alike to
    q and k, so every score is the same)."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    if interleave:
        half = x.shape[-1] // 2
        c, s = cos[..., :half], sin[..., :half]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DeepseekAttention(nn.Module):
    """MLA projections, norms and rotary around the latent-cache attention layer `attn`.

    TP: q_b_proj (or q_proj) and kv_b_proj are column-parallel by heads, o_proj row-parallel; q_a_proj and
    kv_a_proj_with_mqa are replicated, so every rank computes and caches the same latent.
    """

    def __init__(self, hf_config, rotary_emb: RotaryEmbedding):
        super().__init__()
        cfg = hf_config
        hidden, heads = cfg.hidden_size, cfg.num_attention_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        qk_dim = self.nope + self.rope
        bias = bool(getattr(cfg, "attention_bias", False))
        self.q_lora_rank = getattr(cfg, "q_lora_rank", None)
        if self.q_lora_rank:
            self.q_a_proj = ReplicatedLinear(hidden, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, 1e-6)  # HF's default eps, not rms_norm_eps
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, heads * qk_dim)
            local_q = self.q_b_proj
        else:
            self.q_proj = ColumnParallelLinear(hidden, heads * qk_dim)
            local_q = self.q_proj
        self.num_heads = local_q.weight.shape[0] // qk_dim  # this rank's heads
        self.kv_a_proj_with_mqa = ReplicatedLinear(hidden, self.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, 1e-6)
        # 16-bit: MLA reads its weight directly (absorbed into q and the output); a block-fp8 checkpoint's copy
        # is dequantized at load
        self.kv_b_proj = UnquantizedColumnParallelLinear(self.kv_lora_rank, heads * (self.nope + self.v_dim))
        self.o_proj = RowParallelLinear(heads * self.v_dim, hidden, bias=bias)
        self.rotary_emb = rotary_emb  # cos/sin tables of qk_rope_head_dim, YaRN-scaled; shared by all layers
        # V2's rotary is always interleaved; V3 says so in rope_interleave (default True)
        self.interleave = bool(getattr(cfg, "rope_interleave", True))
        self.attn = MLAAttention(self.num_heads, self.nope, self.rope, self.v_dim, self.kv_lora_rank,
                                 mla_softmax_scale(cfg))

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden)))
        else:
            q = self.q_proj(hidden)
        q = q.view(-1, self.num_heads, self.nope + self.rope)
        kv_a = self.kv_a_proj_with_mqa(hidden)
        # on a GPU: the latent's norm, both rotaries and the latent write in one kernel (the same math as below)
        rot = self.rotary_emb
        q_pe = self.attn.fused_prologue(q, kv_a, positions, rot.cos_cache, rot.sin_cache, self.kv_a_layernorm.weight,
                                        self.kv_a_layernorm.eps, self.interleave, meta)
        if q_pe is not None:
            out = self.attn(q[..., : self.nope], q_pe, None, None, self.kv_b_proj.weight, meta)
            return self.o_proj(out)
        q_nope, q_pe = q.split([self.nope, self.rope], dim=-1)
        kv_c, k_pe = kv_a.split([self.kv_lora_rank, self.rope], dim=-1)
        kv_c = self.kv_a_layernorm(kv_c.contiguous())
        cos, sin = self.rotary_emb.cos_cache[positions], self.rotary_emb.sin_cache[positions]
        q_pe = apply_deepseek_rotary(q_pe, cos, sin, self.interleave)
        k_pe = apply_deepseek_rotary(k_pe.unsqueeze(1), cos, sin, self.interleave).squeeze(1)
        return self.o_proj(self.attn(q_nope, q_pe, kv_c, k_pe, self.kv_b_proj.weight, meta))


class DeepseekRouter(nn.Module):
    """The gate: float32 logits from a float32 weight (HF keeps gate.weight and the correction bias in fp32
    even in bf16 models, and routing is sensitive to it)."""

    def __init__(self, hidden_size: int, num_experts: int, correction_bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32), requires_grad=False)
        if correction_bias:
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32),
                                                        requires_grad=False)
        else:
            self.register_parameter("e_score_correction_bias", None)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden.float(), self.weight)


class DeepseekMoE(nn.Module):
    """Routed experts (fused, TP- or expert-parallel) plus the shared experts every token goes through."""

    def __init__(self, hf_config, routing_for):
        super().__init__()
        cfg = hf_config
        experts, width = num_experts(cfg), expert_intermediate_size(cfg)
        self.gate = DeepseekRouter(cfg.hidden_size, experts, correction_bias=routing_for.uses_correction_bias)
        self.experts = FusedMoE(experts, cfg.hidden_size, width, routing_for(self.gate))
        shared = int(getattr(cfg, "n_shared_experts", None) or 0)
        self.shared_experts = LlamaMLP(cfg, width * shared) if shared else None
        # the slices _foldable_shared_mlp may hand the routed experts: a 16-bit MLP without biases only
        mlp = self.shared_experts
        foldable = mlp is not None and not any(
            p.quantized or p.bias is not None for p in (mlp.gate_up_proj, mlp.down_proj))
        self.experts.foldable_shared_experts = shared if foldable else 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.gate(hidden)
        shared = self._foldable_shared_mlp(hidden.shape[0])
        if shared is not None:  # the shared MLP rides in the experts' launches: S more experts of weight one
            return self.experts(hidden, logits, shared_mlp=shared)
        out = self.experts(hidden, logits)
        if self.shared_experts is not None:
            out = out + self.shared_experts(hidden)
        return out

    def _foldable_shared_mlp(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This rank's (gate_up, down) weights of the shared MLP when the routed experts can add it
        (FusedMoE.folds_shared_mlp: batch 1 on the Triton path, every batch with moe_fuse_shared; 16-bit, no
        bias), else None. Its slice of the S * I units is S * (I / TP) wide, gate/up rows and down columns
        cut alike, so it splits into S slices of the experts' width on every rank; a shared expert's weight is
        one (HF adds shared_experts(x) unscaled: routed_scaling_factor is in the routed weights only)."""
        if not self.experts.foldable_shared_experts or not self.experts.folds_shared_mlp(num_tokens):
            return None
        return self.shared_experts.gate_up_proj.weight, self.shared_experts.down_proj.weight


class _RoutingFactory:
    """Builds a layer's GroupedTopK from the config once the router (and its bias) exists."""

    def __init__(self, hf_config, version: int):
        cfg = hf_config
        self.cfg, self.version = cfg, version
        self.uses_correction_bias = version == 3

    def __call__(self, gate: DeepseekRouter) -> GroupedTopK:
        cfg = self.cfg
        if self.version == 3:
            return GroupedTopK(cfg.num_experts_per_tok, int(cfg.n_group or 1), int(cfg.topk_group or 1), "sigmoid",
                               "top2_sum", bool(cfg.norm_topk_prob), float(cfg.routed_scaling_factor),
                               gate.e_score_correction_bias)
        method = getattr(cfg, "topk_method", None) or "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"DeepSeek-V2 topk_method {method!r} is not supported (greedy, group_limited_greedy)")
        grouped = method == "group_limited_greedy"
        # HF's V2 router never renormalizes (every released V2 config has norm_topk_prob false)
        return GroupedTopK(cfg.num_experts_per_tok, int(cfg.n_group or 1) if grouped else 1,
                           int(cfg.topk_group or 1) if grouped else 1, "softmax", "max", False,
                           float(cfg.routed_scaling_factor))


class DeepseekV2ForCausalLM(MoeForCausalLM):
    """DeepSeek-V2 (and V2-Lite: no q_lora_rank): MLA, softmax greedy / group-limited routing."""

    version = 2
    # only the MLPs' gate/up are merged; q_proj (V2-Lite) stays a plain column-parallel layer
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def make_attention(self, layer: int, rotary_emb: RotaryEmbedding) -> nn.Module:
        return DeepseekAttention(self.config, rotary_emb)

    def make_mlp(self, layer: int) -> nn.Module:
        cfg = self.config
        if not is_sparse_layer(cfg, layer):
            return LlamaMLP(cfg)
        return DeepseekMoE(cfg, _RoutingFactory(cfg, self.version))

    def checkpoint_name(self, name: str) -> str | None:
        # real V3 checkpoints carry the multi-token-prediction layer(s) after the last decoder layer
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= self.config.num_hidden_layers:
            return None
        return super().checkpoint_name(name)


class DeepseekV3ForCausalLM(DeepseekV2ForCausalLM):
    """DeepSeek-V3 / R1: MLA with q_lora_rank, sigmoid scores with e_score_correction_bias, group-limited
    top-k (n_group / topk_group), norm_topk_prob, routed_scaling_factor."""

    version = 3
