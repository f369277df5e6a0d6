"""EAGLE-3: a one-layer draft head that reads the target's own hidden states and proposes k tokens.

The public checkpoint layout (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B; config architectures
LlamaForCausalLMEagle3): fc [H, 3 x target H] folds the target's residual stream at three layers (low, middle,
high) into one hidden state; midlayer.* is one Llama decoder layer whose attention reads
concat(input_layernorm(embedding), hidden_norm(hidden)) (q/k/v take 2 x H); norm; lm_head over a draft
vocabulary of draft_vocab_size ids, mapped to target ids by d2t (target = draft + d2t[draft]); t2d (unused
here); embed_tokens, when absent, is the target's.

Position p of the head pairs the target's hidden state at p with the token at p + 1 and predicts the token at
p + 2. After each target step the head first runs over every position the target kept (its KV, in a pool of its
own indexed by the target's block tables like a draft model's), then k - 1 single-token steps, each feeding
back its own pre-norm hidden state. Proposals are argmax (verification treats them as one-hot).
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from meshserve.config import EngineConfig
from meshserve.distributed.parallel_state import tensor_parallel_forward
from meshserve.engine.kv_pool import KVCachePool
from meshserve.engine.runner_output import ModelRunnerOutput
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.engine.step_inputs import StepInputBuilder
from meshserve.errors import InvalidArgumentError, ModelLoadError
from meshserve.layers.attention import Attention
from meshserve.layers.backend_selection import TORCH_DTYPES, bind_kernels, select_kernels
from meshserve.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from meshserve.layers.linear import QKVParallelLinear, ReplicatedLinear
from meshserve.layers.norm import RMSNorm
from meshserve.layers.rotary import RotaryEmbedding
from meshserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP, family_switches
from meshserve.models.checkpoint_files import iter_checkpoint, load_hf_config
from meshserve.models.loader import ModelSource, load_tensors
from meshserve.spec_decode.config import SpeculativeConfig
from meshserve.spec_decode.draft_model import DraftModelProposer, step_tokens

ARCHITECTURE = "LlamaForCausalLMEagle3"
# checkpoint tensors every head has (midlayer's projections unmerged, as published)
REQUIRED_TENSORS = (
    "fc.weight",
    "midlayer.hidden_norm.weight",
    "midlayer.input_layernorm.weight",
    "midlayer.post_attention_layernorm.weight",
    "midlayer.self_attn.q_proj.weight",
    "midlayer.self_attn.k_proj.weight",
    "midlayer.self_attn.v_proj.weight",
    "midlayer.self_attn.o_proj.weight",
    "midlayer.mlp.gate_proj.weight",
    "midlayer.mlp.up_proj.weight",
    "midlayer.mlp.down_proj.weight",
    "norm.weight",
    "lm_head.weight",
)


def _bad(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"speculative_config.model: {msg}", param="speculative_config")


def aux_layer_ids(head_config, num_target_layers: int) -> list[int]:
    """The three target layers whose input residual stream fc reads, ascending: the config's
    eagle_aux_hidden_state_layer_ids (top level or in eagle_config), else vLLM's (2, L // 2, L - 3)."""
    eagle = getattr(head_config, "eagle_config", None) or {}
    ids = getattr(head_config, "eagle_aux_hidden_state_layer_ids", None) or eagle.get(
        "eagle_aux_hidden_state_layer_ids"
    )
    given = ids is not None
    ids = list(ids) if given else [2, num_target_layers // 2, num_target_layers - 3]
    if len(set(ids)) != 3 or not all(isinstance(i, int) and 0 <= i < num_target_layers for i in ids):
        where = "eagle_aux_hidden_state_layer_ids" if given else "the default layers (2, L // 2, L - 3)"
        raise _bad(f"{where} {ids} are not 3 distinct layers of the target's {num_target_layers}")
    return sorted(ids)


def _bin_file(path: str) -> str | None:
    """The head's pytorch_model.bin where it has no safetensors (some public heads ship only that)."""
    file = os.path.join(path, "pytorch_model.bin")
    has_safetensors = any(f.endswith(".safetensors") for f in os.listdir(path))
    return file if os.path.isfile(file) and not has_safetensors else None


def _read_bin(file: str) -> dict[str, torch.Tensor]:
    try:  # tensors only (weights_only: no pickled code runs), memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelLoadError(f"corrupt weights file {file}: {str(e).splitlines()[0]}") from e


def _checkpoint_tensors(path: str):
    """(name, tensor or lazy safetensors slice) of every checkpoint tensor."""
    file = _bin_file(path)
    return iter(_read_bin(file).items()) if file else iter_checkpoint(path)


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the safetensors headers (no tensor is read) or the .bin's mapped tensors."""
    file = _bin_file(path)
    if file:
        return {name: tuple(t.shape) for name, t in _read_bin(file).items()}
    return {name: tuple(part.get_shape()) for name, part in iter_checkpoint(path)}


def _layer_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """midlayer's and norm's tensor shapes by the head's config (q/k/v read 2 x hidden: embedding + hidden)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    m = "midlayer."
    return {
        **{f"{m}{n}.weight": (h,) for n in ("hidden_norm", "input_layernorm", "post_attention_layernorm")},
        f"{m}self_attn.q_proj.weight": (heads * head_dim, 2 * h),
        f"{m}self_attn.k_proj.weight": (kv_heads * head_dim, 2 * h),
        f"{m}self_attn.v_proj.weight": (kv_heads * head_dim, 2 * h),
        f"{m}self_attn.o_proj.weight": (h, heads * head_dim),
        f"{m}mlp.gate_proj.weight": (inter, h),
        f"{m}mlp.up_proj.weight": (inter, h),
        f"{m}mlp.down_proj.weight": (h, inter),
        "norm.weight": (h,),
    }


@dataclasses.dataclass
class Eagle3Layout:
    """What check_eagle3_head learnt from the checkpoint: the layers fc reads and whether it has an
    embedding of its own."""

    source: ModelSource
    layer_ids: list[int]
    own_embedding: bool


def check_eagle3_head(spec: SpeculativeConfig, target_hf_config, tp: int = 1, pp: int = 1) -> Eagle3Layout:
    """Read the head's config and tensor shapes and refuse one that cannot draft for the target (one line)."""
    from meshserve.engine.args_check import check_parallel_split

    path = spec.model
    if not os.path.isdir(path) or not os.path.isfile(os.path.join(path, "config.json")):
        raise _bad(
            f"{path} is not an EAGLE-3 checkpoint folder (config.json, *.safetensors or pytorch_model.bin)"
        )
    try:
        cfg = load_hf_config(path)
        shapes = _checkpoint_shapes(path)
    except ModelLoadError as e:
        raise _bad(str(e)) from e
    archs = getattr(cfg, "architectures", None) or []
    if ARCHITECTURE not in archs and "Eagle3" not in "".join(archs):
        raise _bad(f"{path} is not an EAGLE-3 head (architectures {archs}, expected {ARCHITECTURE})")
    if pp > 1:
        raise _bad(
            "EAGLE-3 does not run with pipeline parallelism (the head reads the first and last stages)"
        )
    missing = [n for n in REQUIRED_TENSORS if n not in shapes]
    if missing:
        raise _bad(f"the EAGLE-3 checkpoint in {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    target_h, target_vocab = target_hf_config.hidden_size, target_hf_config.vocab_size
    h = cfg.hidden_size
    head_target_h = getattr(cfg, "target_hidden_size", None) or h
    if head_target_h != target_h or shapes["fc.weight"] != (h, 3 * target_h):
        raise _bad(
            f"the head reads target hidden states of size {head_target_h} (fc {list(shapes['fc.weight'])}), "
            f"the target's are {target_h} (fc must be [{h}, {3 * target_h}])"
        )
    if cfg.vocab_size != target_vocab:
        raise _bad(f"the head's vocabulary ({cfg.vocab_size} ids) differs from the target's ({target_vocab})")
    draft_vocab = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
    if shapes["lm_head.weight"] != (draft_vocab, h):
        raise _bad(
            f"lm_head is {list(shapes['lm_head.weight'])}, expected [{draft_vocab}, {h}] (draft_vocab_size)"
        )
    if draft_vocab != target_vocab and shapes.get("d2t") != (draft_vocab,):
        raise _bad(
            f"a draft vocabulary of {draft_vocab} ids needs d2t [{draft_vocab}] (draft id -> target id)"
        )
    for name, want in _layer_shapes(cfg).items():
        if shapes[name] != want:
            raise _bad(f"{name} is {list(shapes[name])}, its config.json says {list(want)}")
    own_embedding = "embed_tokens.weight" in shapes
    if own_embedding and shapes["embed_tokens.weight"] != (target_vocab, h):
        raise _bad(f"embed_tokens is {list(shapes['embed_tokens.weight'])}, expected [{target_vocab}, {h}]")
    if not own_embedding and h != target_h:
        raise _bad(f"the head has no embed_tokens and its hidden size {h} is not the target's ({target_h})")
    check_parallel_split(cfg, tp, 1, None)
    layer_ids = aux_layer_ids(cfg, target_hf_config.num_hidden_layers)
    return Eagle3Layout(ModelSource(path, cfg, path, None), layer_ids, own_embedding)


class Eagle3Layer(nn.Module):
    """midlayer: a Llama decoder layer over concat(embedding, hidden state) (q/k/v take 2 x hidden)."""

    def __init__(self, cfg, rotary_emb: RotaryEmbedding):
        super().__init__()
        h = cfg.hidden_size
        self.self_attn = LlamaAttention(cfg, rotary_emb)
        a = self.self_attn
        a.qkv_proj = QKVParallelLinear(
            2 * h,
            a.head_dim,
            cfg.num_attention_heads,
            getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            bias=family_switches(cfg)["qkv_bias"],
        )
        self.mlp = LlamaMLP(cfg)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.norm_before_residual = bool(getattr(cfg, "norm_before_residual", False))

    def forward(self, positions, embeds, hidden, meta):
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        x = self.self_attn(positions, x, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Eagle3Head(nn.Module):
    """The head, with parameter names of the checkpoint (q/k/v and gate/up merged on load).

    forward(input_ids, positions, meta, hidden) -> (normed, pre-norm) hidden states: the first feeds
    compute_logits (draft vocabulary), the second the next draft step. hidden None: zeros (warm-up)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping

    def __init__(self, cfg, target_hidden_size: int, max_position: int, embed_tokens: nn.Module | None):
        super().__init__()
        h = cfg.hidden_size
        self.config = cfg
        self.draft_vocab_size = getattr(cfg, "draft_vocab_size", None) or cfg.vocab_size
        head_dim = getattr(cfg, "head_dim", None) or h // cfg.num_attention_heads
        self.fc = ReplicatedLinear(3 * target_hidden_size, h, bias=False)
        self.midlayer = Eagle3Layer(cfg, RotaryEmbedding(cfg, head_dim, max_position))
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, h)
        # draft id -> target id offset; t2d is kept for the checkpoint's sake (optional: no use here)
        self.d2t = nn.Parameter(torch.zeros(self.draft_vocab_size, dtype=torch.long), requires_grad=False)
        self.d2t.optional = self.draft_vocab_size == cfg.vocab_size
        self.t2d = nn.Parameter(torch.zeros(cfg.vocab_size, dtype=torch.bool), requires_grad=False)
        self.t2d.optional = True
        if embed_tokens is None:
            self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, h)
            self.embed = self.embed_tokens
        else:  # the target's, not registered here (its weights are the target's)
            self.embed = embed_tokens.forward

    def combine(self, aux: torch.Tensor) -> torch.Tensor:
        """The target's three hidden states [n, 3 x target H] -> one [n, H]."""
        return self.fc(aux)

    def forward(self, input_ids, positions, meta, hidden=None):
        embeds = self.embed(input_ids)
        if hidden is None:
            hidden = torch.zeros_like(embeds)
        x, residual = self.midlayer(positions, embeds, hidden, meta)
        return self.norm(x, residual)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def attention_layers(self) -> list[Attention]:
        return [self.midlayer.self_attn.attn]


class AuxHiddenStates:
    """The target's residual stream entering three of its layers, captured by forward pre-hooks into one
    static buffer [rows, 3 x H] (static so that CUDA graphs replay the copies into it). Hooks are registered
    only when an EAGLE-3 head is configured: the plain forward is untouched."""

    def __init__(self, target: nn.Module, layer_ids: list[int], rows: int, device: torch.device):
        self.hidden_size = target.config.hidden_size
        dtype = next(target.parameters()).dtype
        self.buffer = torch.zeros(rows, 3 * self.hidden_size, dtype=dtype, device=device)
        self.handles = [
            target.model.layers[i].register_forward_pre_hook(self._hook(slot))
            for slot, i in enumerate(layer_ids)
        ]

    def _hook(self, slot: int):
        h = self.hidden_size

        def capture(module, args):
            _, hidden, residual = args[:3]
            n = hidden.shape[0]
            if n > self.buffer.shape[0]:
                if hidden.is_cuda and torch.cuda.is_current_stream_capturing():
                    raise RuntimeError(
                        f"EAGLE-3 hidden-state buffer holds {self.buffer.shape[0]} rows, a graph takes {n}"
                    )
                self.buffer = torch.zeros(
                    n, self.buffer.shape[1], dtype=self.buffer.dtype, device=self.buffer.device
                )
            out = self.buffer[:n, slot * h : (slot + 1) * h]
            if residual is None:  # layer 0: the embedding
                out.copy_(hidden)
            else:
                torch.add(hidden, residual, out=out)

        return capture

    def rows(self, n: int) -> torch.Tensor:
        return self.buffer[:n]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


class Eagle3Proposer(DraftModelProposer):
    """One rank's EAGLE-3 head, its KV pool, its batch builder and the target's captured hidden states;
    the engine sees it as a draft model (propose_after, allocate, kv_pool, lookahead slots)."""

    def __init__(self, config: EngineConfig, device: torch.device, target: nn.Module):
        # not the draft model's __init__ (which builds a model from a checkpoint): the same fields, for a head
        spec = config.speculative_config
        pc = config.parallel_config
        layout = check_eagle3_head(
            spec, config.model_config.hf_config, pc.tensor_parallel_size, pc.pipeline_parallel_size
        )
        self.k = spec.num_speculative_tokens
        self.device = device
        cfg = layout.source.hf_config
        self.config = dataclasses.replace(
            config, model_config=dataclasses.replace(config.model_config, model=spec.model, hf_config=cfg)
        )
        kernels = select_kernels(self.config)
        dtype = TORCH_DTYPES[config.model_config.dtype]
        old_dtype = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                self.model = Eagle3Head(
                    cfg,
                    config.model_config.hf_config.hidden_size,
                    config.model_config.max_model_len + 2 * self.k + 1,
                    None if layout.own_embedding else target.model.embed_tokens,
                )
        finally:
            torch.set_default_dtype(old_dtype)
        load_tensors(self.model, _checkpoint_tensors(spec.model), f"EAGLE-3 checkpoint in {spec.model}")
        self.model.eval()
        bind_kernels(self.model, kernels)
        self.kv_pool = KVCachePool(self.config, self.model.attention_layers(), kernels.kv_cache_dtype, device)
        self.inputs = StepInputBuilder(config.cache_config.block_size, device)
        sc = config.scheduler_config
        rows = max(
            sc.max_num_batched_tokens, config.max_cudagraph_tokens or 0, sc.max_num_seqs * (self.k + 1)
        )
        self.aux = AuxHiddenStates(target, layout.layer_ids, rows, device)
        # a prefill chunk's last position waits for the next chunk's first token: its hidden state, by sequence
        self.carry: dict[str, tuple[int, torch.Tensor]] = {}
        self.max_carry = 2 * sc.max_num_seqs

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledSequence], result: ModelRunnerOutput) -> dict[str, list[int]]:
        new_tokens = step_tokens(scheduled, result, self.device)
        aux = self.aux.rows(sum(len(e.token_ids) for e in scheduled))
        first, pieces, sampling, start = [], [], [], 0
        if len(self.carry) > self.max_carry:  # sequences that ended mid-prefill
            live = {e.seq_id for e in scheduled}
            self.carry = {sid: c for sid, c in self.carry.items() if sid in live}
        for e in scheduled:
            n, c = len(e.token_ids), e.num_computed_tokens
            if e.do_sample:  # the positions the target kept, each paired with the token after it
                toks = new_tokens[e.seq_id]
                kept = n - e.num_spec_tokens + len(toks) - 1
                ids = e.token_ids[1:kept] + [toks[-1]]
            else:  # a prefill chunk: its last position waits for the next chunk's first token
                kept, ids = n - 1, e.token_ids[1:]
            carried = self.carry.pop(e.seq_id, None)
            if carried is not None and carried[0] == c - 1:  # the previous chunk's last position
                ids, c = [e.token_ids[0], *ids], c - 1
                pieces.append(carried[1])
            pieces.append(aux[start : start + kept])
            if not e.do_sample:
                self.carry[e.seq_id] = (e.num_computed_tokens + n - 1, aux[start + n - 1 : start + n].clone())
            start += n
            if ids:
                first.append(ScheduledSequence(e.seq_id, ids, c, e.block_table, None, e.do_sample))
                if e.do_sample:
                    sampling.append((e, c + len(ids)))
        if not first:
            return {}
        hidden = self.model.combine(torch.cat(pieces))
        (normed, prenorm), meta = self._forward(first, 0, None, {}, hidden)
        if not sampling:
            return {}
        ends = meta.query_start_loc_cpu[1:]
        rows = torch.tensor([q - 1 for q, f in zip(ends, first) if f.do_sample], device=self.device)
        drafts = [self._argmax(normed[rows])]
        hidden = prenorm[rows]
        last_rows = {e.seq_id: i for i, (e, _) in enumerate(sampling)}
        for j in range(1, self.k):
            step = [
                ScheduledSequence(e.seq_id, [-1], pos + j - 1, e.block_table, None, True)
                for e, pos in sampling
            ]
            (normed, hidden), _ = self._forward(step, j & 1, drafts[-1], last_rows, hidden)
            drafts.append(self._argmax(normed))
        proposals = torch.stack(drafts, dim=1).tolist()
        return {e.seq_id: p for (e, _), p in zip(sampling, proposals)}

    def _forward(self, scheduled, parity, last_sampled, last_rows, hidden):
        input_ids, positions, meta = self.inputs.build(scheduled, parity, last_sampled, last_rows)
        with tensor_parallel_forward():
            return self.model(input_ids, positions, meta, hidden), meta

    def _argmax(self, normed: torch.Tensor) -> torch.Tensor:
        """Greedy proposals as target ids (the draft-vocabulary argmax through d2t)."""
        return self.model.to_target_ids(self.model.compute_logits(normed).argmax(dim=-1))
