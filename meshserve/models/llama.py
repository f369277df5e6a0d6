"""The Llama family: Llama 2/3/3.1, Mistral, Qwen2 (QKV bias) and Qwen3 (q/k RMSNorm), tied or untied.

One implementation; the families differ only in config switches read from the transformers config.
The model holds math only: ranks live in the parallel layers, KV memory in the attention layers.
"""

from typing import ClassVar

import torch
from torch import nn

from meshserve.distributed.parallel_state import get_tp_size
from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.layers.activation import SiluAndMul
from meshserve.layers.all_reduce_norm import all_reduce_rms_norm
from meshserve.layers.attention import Attention
from meshserve.layers.decode_layer import DecodeLayerRun
from meshserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from meshserve.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from meshserve.layers.norm import RMSNorm
from meshserve.layers.norm_fold import NormFold
from meshserve.layers.norm_linear import norm_linear
from meshserve.layers.pipeline import IntermediateTensors, PPMissingLayer, make_pipeline_layers, pp_stage
from meshserve.layers.rotary import RotaryEmbedding


def family_switches(hf_config) -> dict:
    """The per-family differences, derived from the config's model_type and fields."""
    model_type = getattr(hf_config, "model_type", "llama")
    qkv_bias = (model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False))
                or bool(getattr(hf_config, "qkv_bias", False)))  # Qwen2-MoE names it qkv_bias
    sliding_window = getattr(hf_config, "sliding_window", None)
    if model_type in ("qwen2", "qwen3", "qwen2_moe") and not getattr(hf_config, "use_sliding_window", False):
        sliding_window = None
    return {
        "qkv_bias": qkv_bias,
        "o_bias": bool(getattr(hf_config, "attention_bias", False)) and model_type != "qwen2",
        "qk_norm": model_type in ("qwen3", "qwen3_moe"),
        "mlp_bias": bool(getattr(hf_config, "mlp_bias", False)),
        "sliding_window": sliding_window,
    }


class LlamaAttention(nn.Module):
    """QKV projection, q/k RMSNorm (Qwen3), rotary, paged attention, output projection.

    The plain path does each step here; when the attention layer's backend fuses the prologue, it splits,
    norms, rotates and writes the KV cache in one kernel instead. Either way the cache is written by the
    attention layer's backend, never by the model.
    """

    def __init__(self, hf_config, rotary_emb: RotaryEmbedding):
        super().__init__()
        sw = family_switches(hf_config)
        hidden = hf_config.hidden_size
        num_heads = hf_config.num_attention_heads
        num_kv_heads = getattr(hf_config, "num_key_value_heads", None) or num_heads
        self.head_dim = getattr(hf_config, "head_dim", None) or hidden // num_heads
        self.qkv_proj = QKVParallelLinear(hidden, self.head_dim, num_heads, num_kv_heads, bias=sw["qkv_bias"])
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(num_heads * self.head_dim, hidden, bias=sw["o_bias"])
        eps = hf_config.rms_norm_eps
        self.q_norm = RMSNorm(self.head_dim, eps) if sw["qk_norm"] else None
        self.k_norm = RMSNorm(self.head_dim, eps) if sw["qk_norm"] else None
        self.rotary_emb = rotary_emb  # one table shared by all layers
        self.attn = Attention(self.num_heads, self.head_dim, self.num_kv_heads, self.head_dim**-0.5,
                              sliding_window=sw["sliding_window"])

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        return self.from_qkv(positions, self.qkv_proj(hidden), meta)

    def from_qkv(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata,
                 reduce: bool = True) -> torch.Tensor:
        """forward after the QKV projection (which the decoder layer may have fused with its norm);
        reduce=False: o_proj's partial sums, left for the decoder layer to all-reduce with the next norm."""
        return self.o_proj(self.attend(positions, qkv, meta), reduce)

    def attend(self, positions: torch.Tensor, qkv: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """The attention output before o_proj (which a folded norm runs with the residual add)."""
        if self.attn.can_fuse_prologue:
            # the attention backend's one kernel: split, q/k norm, rotary, KV write (same roundings as below)
            return self.attn.forward_qkv(qkv, positions, self.rotary_emb, self.q_norm, self.k_norm, meta)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.attn(q, k, v, meta)


class LlamaMLP(nn.Module):
    def __init__(self, hf_config, intermediate_size: int | None = None):
        super().__init__()
        bias = family_switches(hf_config)["mlp_bias"]
        hidden, inter = hf_config.hidden_size, intermediate_size or hf_config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [inter, inter], bias=bias)
        self.down_proj = RowParallelLinear(inter, hidden, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.gate_up_proj.act_forward(x)  # on a GPU: SiLU-and-mul in the gate/up GEMV's (GEMM's) epilogue
        if act is not None:
            return self.down_proj(act)
        return self.from_gate_up(self.gate_up_proj(x))

    def norm_forward_act(self, norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None):
        """(forward(norm(x + residual)), x + residual) with the norm in the gate/up GEMV and SiLU-and-mul in its
        epilogue (batch 1, the norm_gemv switch: layers/norm_linear.py), or None where that path does not apply."""
        gate_up = self.gate_up_proj
        # (only the two-kernel norm_gemv path has the epilogue: without its switch, nothing to ask norm_linear)
        if gate_up.quantized or not (gate_up.takes_act_out and gate_up.kernels.norm_gemv):
            return None
        fused = norm_linear(norm, gate_up, x, residual, act_out=True)
        return None if fused is None else (self.down_proj(fused[0]), fused[1])

    def from_gate_up(self, gate_up: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """forward after the gate/up projection (which the decoder layer may have fused with its norm);
        reduce=False: down_proj's partial sums, left for the caller to all-reduce with the next norm."""
        # batch 1 on a GPU: the activation inside the GEMV; fp8 weights: SiLU-and-mul writes fp8 rows
        fused = self.down_proj.fused_gated_forward(gate_up, reduce)
        return fused if fused is not None else self.down_proj(self.act_fn(gate_up), reduce)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, hf_config, rotary_emb: RotaryEmbedding, mlp: nn.Module | None = None,
                 attention: nn.Module | None = None):
        super().__init__()
        # swappable: forward(positions, hidden, meta) with its cache layer as `.attn` (DeepSeek's MLA)
        self.self_attn = attention if attention is not None else LlamaAttention(hf_config, rotary_emb)
        self.mlp = mlp if mlp is not None else LlamaMLP(hf_config)  # swappable: MoE blocks replace it
        self.input_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps)
        # the norms fold into the next projection only where that projection is ours (not MLA's, not MoE's)
        self.folds_attn_norm = isinstance(self.self_attn, LlamaAttention)
        self.folds_mlp_norm = isinstance(self.mlp, LlamaMLP)

    def forward(self, positions, hidden, residual, meta, fold: NormFold | None = None):
        if fold is not None:
            return self.forward_folded(positions, hidden, meta, fold)
        # batch-1 decode: each norm runs inside the next projection's GEMV; fp8 weights: the norm writes the
        # projection's fp8 rows (layers/norm_linear.py)
        fused = None
        if self.folds_attn_norm:
            fused = norm_linear(self.input_layernorm, self.self_attn.qkv_proj, hidden, residual)
        if fused is not None:
            qkv, residual = fused
            hidden = self.self_attn.from_qkv(positions, qkv, meta)
        elif residual is None:
            residual = hidden
            hidden = self.self_attn(positions, self.input_layernorm(hidden), meta)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
            hidden = self.self_attn(positions, hidden, meta)
        fused = None
        if self.folds_mlp_norm:
            done = self.mlp.norm_forward_act(self.post_attention_layernorm, hidden, residual)
            if done is not None:
                return done
            fused = norm_linear(self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual)
        if fused is not None:
            gate_up, residual = fused
            return self.mlp.from_gate_up(gate_up), residual
        elif hasattr(self.mlp, "norm_forward"):  # an MoE block: its router's GEMV may take the norm
            fused = self.mlp.norm_forward(self.post_attention_layernorm, hidden, residual)
            if fused is not None:
                return fused
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual

    def forward_partial(self, positions, partial, residual, meta):
        """forward on the TP path that all-reduces each row-parallel projection's output together with the
        next residual add + RMSNorm (layers/all_reduce_norm.py): takes the previous projection's partial sums
        and returns down_proj's (LlamaModel reduces them with the next layer's norm, or the final one)."""
        hidden, residual = all_reduce_rms_norm(self.input_layernorm, partial, residual)
        attn = self.self_attn
        partial = attn.from_qkv(positions, attn.qkv_proj(hidden), meta, reduce=False)
        hidden, residual = all_reduce_rms_norm(self.post_attention_layernorm, partial, residual)
        return self.mlp.from_gate_up(self.mlp.gate_up_proj(hidden), reduce=False), residual

    def forward_folded(self, positions, hidden, meta, fold: NormFold):
        """forward with both norms inside the GEMVs (batch-1 decode, MESHSERVE_NORM_FOLD: layers/norm_fold.py):
        hidden is the whole residual stream, so the residual is None coming in and going out."""
        attn, mlp = self.self_attn, self.mlp
        qkv = fold.norm_linear(self.input_layernorm, attn.qkv_proj, hidden)
        hidden = fold.linear_residual(attn.o_proj, attn.attend(positions, qkv, meta), hidden)
        gate_up = fold.norm_linear(self.post_attention_layernorm, mlp.gate_up_proj, hidden)
        return fold.linear_residual(mlp.down_proj, gate_up, hidden, act_fn=mlp.act_fn), None


class LlamaModel(nn.Module):
    """Embedding, decoder layers and final norm; with pipeline parallelism only this stage's part."""

    def __init__(self, hf_config, max_position: int, make_mlp=None, make_attention=None):
        super().__init__()
        first, last = pp_stage()
        self.is_last_stage = last
        self.embed_tokens = (VocabParallelEmbedding(hf_config.vocab_size, hf_config.hidden_size) if first
                             else PPMissingLayer())
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
        rotary_emb = RotaryEmbedding(hf_config, head_dim, max_position)
        self.start_layer, self.end_layer, self.layers = make_pipeline_layers(
            hf_config.num_hidden_layers,
            lambda i: LlamaDecoderLayer(hf_config, rotary_emb, make_mlp(i) if make_mlp else None,
                                        make_attention(i, rotary_emb) if make_attention else None))
        self.norm = RMSNorm(hf_config.hidden_size, hf_config.rms_norm_eps) if last else PPMissingLayer()
        # TP without pipeline stages and with only our attention and MLP (whose projections can leave their
        # sums unreduced): each all-reduce can fuse with the add + norm after it, under the selection's switch
        local = self.layers[self.start_layer : self.end_layer]
        self.can_fuse_all_reduce_norm = (first and last and get_tp_size() > 1
                                         and all(layer.folds_attn_norm and layer.folds_mlp_norm for layer in local))

    def forward(self, input_ids, positions, meta, intermediate: IntermediateTensors | None = None):
        if self.can_fuse_all_reduce_norm and self.norm.kernels.tp_fused_norm:
            partial, residual = self.embed_tokens(input_ids, reduce=False), None
            for layer in self.layers[self.start_layer : self.end_layer]:
                partial, residual = layer.forward_partial(positions, partial, residual, meta)
            return all_reduce_rms_norm(self.norm, partial, residual)[0]
        if intermediate is None:
            hidden, residual = self.embed_tokens(input_ids), None
        else:
            hidden, residual = intermediate.hidden, intermediate.residual
        layers = self.layers[self.start_layer : self.end_layer]
        whole = intermediate is None and self.is_last_stage  # one stage: the step's layers all here
        # batch-1 decode with each layer in one launch (opt-in): hidden is the whole residual stream
        run = DecodeLayerRun.begin(hidden, layers, meta) if whole else None
        if run is not None:
            for layer in layers:
                hidden = run.forward(layer, positions, hidden, meta)
            return self.norm(hidden)
        # batch-1 decode with the norms folded into the GEMVs; one stage only (the sums stay on this device)
        fold = NormFold.begin(hidden, layers) if whole else None
        for layer in layers:
            hidden, residual = layer(positions, hidden, residual, meta, fold)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        if residual is None:  # the fold: hidden is the whole residual stream
            return self.norm(hidden)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """Causal LM over the flat token batch: forward gives hidden states, compute_logits the vocab scores.

    On a pipeline stage other than the last, forward returns IntermediateTensors for the next stage.
    """

    # checkpoint name fragment -> (our parameter fragment, shard id) for merged projections
    packed_modules_mapping: ClassVar[dict[str, tuple[str, str | int]]] = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, hf_config, max_position: int | None = None):
        super().__init__()
        max_position = max_position or hf_config.max_position_embeddings
        self.config = hf_config
        self.model = LlamaModel(hf_config, max_position, self.make_mlp, self.make_attention)
        self.tie_word_embeddings = bool(getattr(hf_config, "tie_word_embeddings", False))
        first, last = pp_stage()
        self.lm_head = ParallelLMHead(hf_config.vocab_size, hf_config.hidden_size) if last else PPMissingLayer()
        if self.tie_word_embeddings and first and last:
            self.lm_head.weight = self.model.embed_tokens.weight

    def make_mlp(self, layer: int) -> nn.Module | None:
        """The MLP of decoder layer `layer`; None: the dense LlamaMLP (MoE families override this)."""
        return None

    def make_attention(self, layer: int, rotary_emb: RotaryEmbedding) -> nn.Module | None:
        """The attention of decoder layer `layer`; None: LlamaAttention (DeepSeek's MLA overrides this)."""
        return None

    def checkpoint_name(self, name: str) -> str | None:
        """Where a checkpoint tensor goes in this stage (None: it belongs to another stage)."""
        if self.tie_word_embeddings and name.startswith("lm_head."):
            return None  # tied: the embedding tensor fills both
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            return name if self.model.start_layer <= index < self.model.end_layer else None
        if name.startswith("model.embed_tokens."):
            if isinstance(self.model.embed_tokens, PPMissingLayer):
                # a tied LM head on the last stage reads the embedding tensor
                has_head = self.tie_word_embeddings and not isinstance(self.lm_head, PPMissingLayer)
                return name.replace("model.embed_tokens.", "lm_head.") if has_head else None
            return name
        if name.startswith("model.norm.") and isinstance(self.model.norm, PPMissingLayer):
            return None
        if name.startswith("lm_head.") and isinstance(self.lm_head, PPMissingLayer):
            return None
        return name

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                intermediate: IntermediateTensors | None = None):
        return self.model(input_ids, positions, meta, intermediate)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.layers[self.model.start_layer : self.model.end_layer]]
