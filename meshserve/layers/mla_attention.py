"""Multi-head latent attention (DeepSeek-V2/V3) over the paged latent cache.

The layer owns one cache tensor [1, num_blocks, block_size, 1, R + P]: per token the normalised KV latent
(R = kv_lora_rank) and the rotated shared rotary key (P = qk_rope_head_dim), the same for every head and
every TP rank (the latent is replicated; the heads are split). For DeepSeek-V3 that is 576 numbers per token
and layer instead of 128 heads x (192 for K + 128 for V): ~71x less at TP=1.

Sequences with at most ABSORBED_MAX_QUERY_LEN new tokens (decode rows, speculative verify rows) use the
weight-absorbed form: W_UK is applied to the query (q_lat = W_UK^T q_nope), attention runs over the latents
alone, and W_UV to its output, so a row reads only the R + P numbers per context token instead of expanding
the whole context through kv_b_proj for a handful of queries (Triton on a GPU, kernels/triton_mla.py, whose
one-query kernel serves a verify row j as a sequence cut at its causal limit; the torch reference elsewhere).
Longer prefill chunks expand K and V of their context from its latents: on a GPU for all chunks of the step
at once, a workspace-sized piece of context at a time (kernels/mla_prefill.py: gather, one GEMM through
kv_b_proj, the Triton varlen kernel of kernels/triton_mla_prefill.py, LSE merge; the runner binds one
MLAPrefillWorkspace to every layer, bind_prefill_workspace), elsewhere (or with MESHSERVE_MLA_PREFILL_REF=1)
one sequence at a time (kernels/mla_ref.mla_prefill_ref). A mixed step's split into the two is computed
once per step (meta.step_memo), not per layer. On a GPU with the fused prologue the model's prologue (latent
RMSNorm, both rotaries, the latent write) is one kernel (fused_prologue, kernels/triton_mla_rope.py) and the
absorbed matmuls write straight into their [T, H, .] results (no transposed copies); from 64 decode rows on
(kernels/mla_decode_choice.py; KernelSelection.mla_balanced / MESHSERVE_MLA_BALANCED=1|0 force either) the
decode kernel spreads the batch's KV tiles evenly over the SMs whatever the context lengths
(kernels/triton_mla_balanced.py), below that it splits each sequence (kernels/triton_mla.py); the balanced kernel
runs the pipelined tile loop by default, either does with KernelSelection.mla_decode_kernel "pipelined"
(MESHSERVE_MLA_DECODE_KERNEL, kernels/triton_mla_pipelined.py); KernelSelection.mla_legacy
(MESHSERVE_MLA_LEGACY=1) keeps the path before 2026-11-30 for A/B runs. The block manager,
prefix caching, chunked prefill, preemption and the KV offload tiers see blocks only, so they work unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from meshserve.kernels.attention_metadata import AttentionMetadata
from meshserve.kernels.mla_decode_choice import use_balanced
from meshserve.kernels.mla_prefill import mla_prefill
from meshserve.kernels.mla_prefill_workspace import (
    MLAPrefillWorkspace,
    WorkspaceShape,
    workspace_chunk_tokens,
)
from meshserve.kernels.mla_ref import mla_decode_ref, mla_prefill_ref, write_latent_ref
from meshserve.layers.backend_selection import PLAIN, KernelSelection

# rows with this many new tokens or fewer go through the absorbed form: reading the latents once per query
# costs less than expanding the context (a 2-8 token verify step over a 32k context would expand all 32k)
ABSORBED_MAX_QUERY_LEN = 8


class MLAAttention(nn.Module):
    """The latent cache of one layer and the attention over it.

    forward(q_nope [T, H, N], q_pe [T, H, P] (rotated), kv_c [T, R] (normalised), k_pe [T, P] (rotated),
    kv_b_weight [H * (N + V), R] (this rank's kv_b_proj rows), meta) -> [T, H * V]; kv_c and k_pe None when
    fused_prologue already wrote them.
    """

    def __init__(self, num_heads: int, qk_nope_head_dim: int, qk_rope_head_dim: int, v_head_dim: int,
                 kv_lora_rank: int, scale: float):
        super().__init__()
        self.num_heads, self.qk_nope_head_dim, self.v_head_dim = num_heads, qk_nope_head_dim, v_head_dim
        self.kv_lora_rank, self.qk_rope_head_dim = kv_lora_rank, qk_rope_head_dim
        self.scale = scale
        # what the KV pool and offload tiers read: one "head" of latent + rotary key per token
        self.num_kv_heads = 1
        self.head_dim = kv_lora_rank + qk_rope_head_dim
        self.kv_cache: torch.Tensor | None = None
        self.kernels = PLAIN  # bound by the model runner (layers/backend_selection.py)
        self.prefill_workspace: MLAPrefillWorkspace | None = None  # bound by the runner: bind_prefill_workspace
        # the split kernel's KV splits, fixed by the start-up warm-up to compile each reduce variant
        # (engine/eager_warmup.forced_decode_splits); None: the heuristic (triton_mla.decode_split_count)
        self.decode_num_splits: int | None = None

    def kv_cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (1, num_blocks, block_size, 1, self.head_dim)

    @property
    def max_decode_splits(self) -> int:
        """The most KV splits this layer's decode may pick (0: none, the torch reference or the balanced
        kernel at every batch size)."""
        k = self.kernels
        if k.attention_backend != "triton" or (k.mla_balanced and not k.mla_legacy):
            return 0
        from meshserve.kernels.triton_mla import MLA_MAX_SPLITS

        return MLA_MAX_SPLITS

    def decode_splits(self, num_seqs: int, max_seq_len: int, dtype: torch.dtype, device: torch.device) -> int | None:
        """The KV splits the Triton decode kernel runs for this batch shape (engine/cuda_graph.py keys its
        short-context graph variants by it); None where decode runs the torch reference."""
        if self.kernels.attention_backend != "triton":
            return None
        if self._balanced(num_seqs):
            return 0  # the balanced kernel's launch does not depend on the context bound: no variants
        if self.decode_num_splits is not None:
            return self.decode_num_splits
        from meshserve.kernels.triton_mla import decode_split_count

        return decode_split_count(num_seqs, self.num_heads, self.kv_lora_rank, dtype.itemsize, max_seq_len,
                                  device.index if device.type == "cuda" else None, self.kernels.mla_decode_tile,
                                  self.kernels.mla_legacy)

    def _balanced(self, num_rows: int) -> bool:
        """Whether a Triton decode launch of num_rows query rows runs the balanced kernel (by shape unless
        the selection forces one: kernels/mla_decode_choice.py); never on the legacy path."""
        return not self.kernels.mla_legacy and use_balanced(num_rows, self.kernels.mla_balanced)

    def _use_triton(self, x: torch.Tensor) -> bool:
        return self.kernels.attention_backend == "triton" and x.is_cuda

    def fused_prologue(self, q: torch.Tensor, kv_a: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
                       sin_cache: torch.Tensor, norm_weight: torch.Tensor, eps: float, interleave: bool,
                       meta: AttentionMetadata) -> torch.Tensor | None:
        """The model's prologue in one kernel where this layer runs Triton with the fused prologue: q [T, H, N + P],
        kv_a [T, R + P] (the projections' outputs) -> the rotated q_pe [T, H, P], the normalised latent and
        rotated key written to the cache (then forward takes kv_c = k_pe = None). None: do it unfused."""
        if not (self.kernels.fused_prologue and self._use_triton(q)) or self.kernels.mla_legacy:
            return None
        if self.kv_cache is None:
            raise RuntimeError("MLA layer has no KV cache bound")
        from meshserve.kernels.triton_mla_rope import mla_rope_latent

        return mla_rope_latent(q, kv_a, positions, cos_cache, sin_cache, norm_weight, eps, self.kv_cache,
                               meta.slot_mapping, interleave)

    def forward(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_c: torch.Tensor | None,
                k_pe: torch.Tensor | None, kv_b_weight: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("MLA layer has no KV cache bound")
        triton = self._use_triton(q_nope)
        if kv_c is None:
            pass  # fused_prologue wrote this step's rows
        elif triton:
            from meshserve.kernels.triton_mla import write_latent

            write_latent(kv_c.contiguous(), k_pe.contiguous(), self.kv_cache, meta.slot_mapping)
        else:
            write_latent_ref(kv_c, k_pe, self.kv_cache, meta.slot_mapping)
        if meta.max_query_len <= ABSORBED_MAX_QUERY_LEN:
            return self._absorbed(q_nope, q_pe, kv_b_weight, meta, triton).flatten(1)
        batched = triton and not self.kernels.mla_prefill_ref
        decode = decode_part(meta)
        if decode is None and not batched:  # prefill chunks only
            return mla_prefill_ref(q_nope, q_pe, self.kv_cache, kv_b_weight, meta, self.scale).flatten(1)
        out = q_nope.new_empty(q_nope.shape[0], self.num_heads, self.v_head_dim)
        if decode is not None:
            # decode and verify rows stay absorbed (expanding a long context for a few queries costs far more)
            rows, sub = decode
            out[rows] = self._absorbed(q_nope[rows], q_pe[rows], kv_b_weight, sub, triton)
        if batched:  # every prefill chunk at once, written into its rows of out
            mla_prefill(q_nope, q_pe, self.kv_cache, kv_b_weight, meta, self.scale, out, triton=True,
                        workspace=self.prefill_workspace, min_query_len=ABSORBED_MAX_QUERY_LEN + 1)
        else:
            rows, sub = prefill_part(meta)
            out[rows] = mla_prefill_ref(q_nope[rows], q_pe[rows], self.kv_cache, kv_b_weight, sub, self.scale)
        return out.flatten(1)

    def _absorbed(self, q_nope, q_pe, kv_b_weight, meta: AttentionMetadata, triton: bool) -> torch.Tensor:
        """[T, H, V] through the latents alone (any q_len up to ABSORBED_MAX_QUERY_LEN, causal)."""
        # per-head slices of kv_b_proj: [H, N, R] (W_UK) and [H, V, R] (W_UV), views of the weight
        w_kv = kv_b_weight.view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = w_kv[:, : self.qk_nope_head_dim], w_kv[:, self.qk_nope_head_dim :]
        legacy = self.kernels.mla_legacy
        # out= refuses tensors that need grad: the runner is under inference_mode, a bare module call may not be
        copied = legacy or torch.is_grad_enabled()
        num_tokens = q_nope.shape[0]
        if copied:
            q_lat = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, R]
        else:
            # one strided-batched GEMM per side, head-major views of [T, H, .] buffers: cuBLAS reads q_nope
            # with ld = H * (N + P) and writes q_lat with ld = H * R, so neither side needs a transposed copy
            # (vLLM's MLA does the same with out=)
            q_lat = q_nope.new_empty(num_tokens, self.num_heads, self.kv_lora_rank)
            torch.bmm(q_nope.transpose(0, 1), w_uk, out=q_lat.transpose(0, 1))
        if triton:
            from meshserve.kernels.mla_decode_choice import use_pipelined
            from meshserve.kernels.triton_mla import mla_decode
            from meshserve.kernels.triton_mla_balanced import mla_decode_balanced

            if meta.max_query_len > 1:
                meta = per_query_meta(meta)
            balanced = self._balanced(meta.seq_lens.shape[0])
            pipelined = use_pipelined(self.kernels.mla_decode_kernel, balanced)
            if balanced:
                o_lat = mla_decode_balanced(q_lat, q_pe, self.kv_cache, meta.block_tables, meta.seq_lens,
                                            meta.query_start_loc, self.scale, tile=self.kernels.mla_decode_tile,
                                            prefetch=self.kernels.mla_prefetch,
                                            transposed=self.kernels.mla_transposed, pipelined=pipelined)
            else:
                o_lat = mla_decode(q_lat.contiguous(), q_pe.contiguous() if legacy else q_pe, self.kv_cache,
                                   meta.block_tables, meta.seq_lens, meta.query_start_loc, self.scale,
                                   meta.max_seq_len, num_splits=self.decode_num_splits,
                                   tile=self.kernels.mla_decode_tile, legacy_splits=legacy,
                                   prefetch=self.kernels.mla_prefetch and not legacy,
                                   transposed=self.kernels.mla_transposed and not legacy,
                                   pipelined=pipelined and not legacy)
        else:
            o_lat = mla_decode_ref(q_lat, q_pe, self.kv_cache, meta, self.scale)
        if copied:
            return torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [T, H, V]
        out = o_lat.new_empty(num_tokens, self.num_heads, self.v_head_dim)
        torch.bmm(o_lat.transpose(0, 1), w_uv.transpose(1, 2), out=out.transpose(0, 1))
        return out


def bind_prefill_workspace(model: nn.Module, kernels: KernelSelection, max_num_batched_tokens: int,
                           dtype: torch.dtype, device: torch.device) -> MLAPrefillWorkspace | None:
    """Allocate one MLAPrefillWorkspace for the model's MLA layers and bind it to each, where their prefill
    runs the batched path (Triton on a GPU). Called when the runner starts, before the memory profile, so the
    profile counts it. None (nothing allocated) elsewhere."""
    layers = [m for m in model.modules() if isinstance(m, MLAAttention)]
    batched = kernels.attention_backend == "triton" and not kernels.mla_prefill_ref
    if not layers or not batched or torch.device(device).type != "cuda":
        return None
    first = layers[0]
    shape = WorkspaceShape(chunk_tokens=workspace_chunk_tokens(max_num_batched_tokens),
                           max_query_tokens=max_num_batched_tokens, num_heads=first.num_heads,
                           nope=first.qk_nope_head_dim, rope=first.qk_rope_head_dim, v_dim=first.v_head_dim,
                           rank=first.kv_lora_rank, dtype=dtype)
    workspace = MLAPrefillWorkspace(shape, device)
    for layer in layers:
        layer.prefill_workspace = workspace
    return workspace


def per_query_meta(meta: AttentionMetadata) -> AttentionMetadata:
    """meta's queries as one-token sequences, for the one-query decode kernel: query j of sequence b becomes a
    sequence with b's block table and context seq_len - q_len + j + 1 (its causal limit). Built on the device
    from host-known sizes (no sync), once per step (the sub-metadata's memo is shared by the layers)."""
    if "per_query" not in meta.step_memo:
        device, num_tokens = meta.seq_lens.device, meta.query_start_loc_cpu[-1]
        q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
        seq = torch.repeat_interleave(torch.arange(meta.num_seqs, device=device), q_lens,
                                      output_size=num_tokens)
        j = torch.arange(num_tokens, device=device) - meta.query_start_loc[seq]
        seq_lens_cpu = [meta.seq_lens_cpu[b] - n + j + 1
                        for b, n in enumerate(meta.query_lens_cpu) for j in range(n)]
        meta.step_memo["per_query"] = AttentionMetadata(
            slot_mapping=meta.slot_mapping[:0], query_start_loc=torch.arange(num_tokens + 1, device=device),
            seq_lens=meta.seq_lens[seq] - q_lens[seq] + j + 1, block_tables=meta.block_tables.index_select(0, seq),
            max_query_len=1, max_seq_len=meta.max_seq_len, query_start_loc_cpu=list(range(num_tokens + 1)),
            seq_lens_cpu=seq_lens_cpu)
    return meta.step_memo["per_query"]


def _subset(meta: AttentionMetadata, seqs: list[int], device) -> tuple[torch.Tensor, AttentionMetadata]:
    """The flat rows of sequences `seqs` and the metadata of those sequences alone (their rows packed)."""
    starts, q_lens = meta.query_start_loc_cpu, [meta.query_lens_cpu[i] for i in seqs]
    rows: list[int] = []
    for i in seqs:
        rows.extend(range(starts[i], starts[i + 1]))
    sub_starts = [0]
    for n in q_lens:
        sub_starts.append(sub_starts[-1] + n)
    index = torch.tensor(seqs, dtype=torch.int64, device=device)
    seq_lens = [meta.seq_lens_cpu[i] for i in seqs]
    sub = AttentionMetadata(
        slot_mapping=meta.slot_mapping[:0], query_start_loc=torch.tensor(sub_starts, device=device),
        seq_lens=meta.seq_lens.index_select(0, index), block_tables=meta.block_tables.index_select(0, index),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_start_loc_cpu=sub_starts,
        seq_lens_cpu=seq_lens, query_lens_cpu=q_lens)
    return torch.tensor(rows, dtype=torch.int64, device=device), sub


def _part(meta: AttentionMetadata, single: bool):
    """(rows, meta) of the step's sequences with at most ABSORBED_MAX_QUERY_LEN new tokens (single) or of the
    rest; None when there are none. Host lists only, built once per step: every layer shares the metadata."""
    key = ("mla_part", single)
    if key not in meta.step_memo:
        seqs = [i for i, n in enumerate(meta.query_lens_cpu) if (n <= ABSORBED_MAX_QUERY_LEN) == single]
        meta.step_memo[key] = _subset(meta, seqs, meta.seq_lens.device) if seqs else None
    return meta.step_memo[key]


def decode_part(meta: AttentionMetadata):
    """(flat rows, metadata) of the sequences served absorbed (decode and verify rows), or None."""
    return _part(meta, single=True)


def prefill_part(meta: AttentionMetadata):
    """(flat rows, metadata) of the sequences served expanded (longer prefill chunks), or None."""
    return _part(meta, single=False)
