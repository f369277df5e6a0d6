"""A draft model: a smaller model of the same vocabulary that proposes k tokens autoregressively.

It runs on the target's ranks (tensor-parallel through the same layers) with its own KV pool, indexed by the
target's block tables: the block manager allocates each sequence num_speculative_tokens slots past its step's
tokens (the draft writes its proposals there), and every token whose target KV is computed gets its draft KV
in the same step, so a prefix-cache hit or a recompute after preemption serves both models alike. Proposals
are the draft's argmax (deterministic proposals: verification treats q as one-hot).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from meshserve.config import EngineConfig
from meshserve.distributed.parallel_state import get_parallel_state, tensor_parallel_forward
from meshserve.engine.kv_pool import KVCachePool
from meshserve.engine.runner_output import ModelRunnerOutput, PendingOutput
from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.engine.step_inputs import StepInputBuilder
from meshserve.errors import InvalidArgumentError, ModelLoadError
from meshserve.layers.backend_selection import TORCH_DTYPES, bind_kernels, select_kernels
from meshserve.models.loader import ModelSource, build_model, resolve_model_source
from meshserve.spec_decode.config import SpeculativeConfig


def _bad(msg: str) -> InvalidArgumentError:
    return InvalidArgumentError(f"speculative_config.model: {msg}", param="speculative_config")


def check_draft_model(
    spec: SpeculativeConfig, target_hf_config, max_model_len: int, tp: int = 1,
    target_tokenizer: str | None = None,
) -> ModelSource:
    """Resolve the draft checkpoint and refuse one that cannot draft for the target: one-line errors that
    start with speculative_config.model (the loader's own words, e.g. "model not found", read as the target's)."""
    from meshserve.engine.args_check import check_parallel_split
    from meshserve.models.registry import resolve_model_class

    try:
        source = resolve_model_source(spec.model)
    except ModelLoadError as e:  # its message names the folder, not which model of the two it is
        raise ModelLoadError(f"speculative_config.model: {e}") from None
    cfg = source.hf_config
    archs = getattr(cfg, "architectures", None) or []
    if any("Eagle3" in a for a in archs):
        raise _bad(f'{spec.model} is an EAGLE-3 head ({archs[0]}): set "method": "eagle3"')
    if cfg.vocab_size != target_hf_config.vocab_size:
        raise _bad(f"the draft's vocabulary ({cfg.vocab_size} ids) differs from the target's "
                   f"({target_hf_config.vocab_size}); a draft must share the tokenizer")
    if not same_tokenizer(source.tokenizer_dir, target_tokenizer):
        raise _bad(f"the draft's tokenizer ({source.tokenizer_dir}) maps tokens to other ids than the "
                   f"target's ({target_tokenizer}); a draft must share the tokenizer")
    try:
        resolve_model_class(cfg)
    except ModelLoadError as e:
        raise ModelLoadError(f"speculative_config.model: {e}") from None
    positions = getattr(cfg, "max_position_embeddings", None) or max_model_len
    if positions < max_model_len:
        raise _bad(f"the draft takes {positions} positions, fewer than max_model_len ({max_model_len}): "
                   f"set --max-model-len {positions} or use a draft of a longer context")
    try:
        check_parallel_split(cfg, tp, 1, None)
    except InvalidArgumentError as e:
        raise _bad(f"the draft's {e}") from None
    return source


def _token_ids(folder: str | None) -> dict | None:
    """token -> id of a folder's tokenizer.json (its vocabulary and added tokens), None when unreadable."""
    path = os.path.join(folder, "tokenizer.json") if folder else ""
    try:
        with open(path) as f:
            tok = json.load(f)
        vocab = tok["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(vocab, list):  # Unigram: [token, score] pairs in id order
        vocab = {pair[0]: i for i, pair in enumerate(vocab)}
    return {**vocab, **{t["content"]: t["id"] for t in tok.get("added_tokens") or []}}


def same_tokenizer(draft: str | None, target: str | None) -> bool:
    """Whether two tokenizers agree on every token both know (True when either cannot be read: the vocabulary
    size check is then all there is). A draft of the same family may know fewer added tokens."""
    a, b = _token_ids(draft), _token_ids(target)
    if a is None or b is None:
        return True
    shared = a.keys() & b.keys()
    return len(shared) >= 0.99 * min(len(a), len(b)) and all(a[t] == b[t] for t in shared)


class DraftModelProposer:
    """One rank's draft model, its KV pool and its batch builder; propose() runs after the target's step."""

    def __init__(self, config: EngineConfig, device: torch.device):
        spec = config.speculative_config
        self.k = spec.num_speculative_tokens
        self.device = device
        source = resolve_model_source(spec.model)
        self.config = dataclasses.replace(
            config,
            model_config=dataclasses.replace(
                config.model_config, model=source.name, hf_config=source.hf_config
            ),
        )
        kernels = select_kernels(self.config)
        # proposals may run up to k positions past the target's last one
        try:
            self.model = build_model(
                source,
                TORCH_DTYPES[config.model_config.dtype],
                device,
                config.model_config.max_model_len + 2 * self.k + 1,
                seed=config.model_config.seed,
            )
        except ModelLoadError as e:  # its message names the folder, not which model of the two it is
            raise ModelLoadError(f"speculative_config.model: {e}") from None
        bind_kernels(self.model, kernels)
        self.kv_pool = KVCachePool(self.config, self.model.attention_layers(), kernels.kv_cache_dtype, device)
        self.inputs = StepInputBuilder(config.cache_config.block_size, device)

    def bytes_per_block(self) -> int:
        return self.kv_pool.bytes_per_block()

    def allocate(self, num_blocks: int) -> None:
        self.kv_pool.allocate(num_blocks)

    def propose_after(self, scheduled: list[ScheduledSequence], pending: PendingOutput) -> PendingOutput:
        """Wait for the target's tokens, then add the draft's proposals for every sampling sequence."""
        result = pending.result()
        result.draft_token_ids = self.propose(scheduled, result)
        return PendingOutput(result)

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledSequence], result: ModelRunnerOutput) -> dict[str, list[int]]:
        """First a forward over every token the target kept this step (its inputs up to the accepted ones,
        plus each sampling sequence's new token), then k - 1 single-token steps over the sampling ones."""
        new_tokens = step_tokens(scheduled, result, self.device)
        first, sampling = [], []
        for e in scheduled:
            ids = e.token_ids
            if e.do_sample:
                toks = new_tokens[e.seq_id]
                ids = ids[: len(ids) - e.num_spec_tokens + len(toks) - 1] + [toks[-1]]
                sampling.append((e, e.num_computed_tokens + len(ids)))
            first.append(
                ScheduledSequence(e.seq_id, ids, e.num_computed_tokens, e.block_table, None, e.do_sample)
            )
        if not sampling:
            self._forward(first, 0, None, {})
            return {}
        hidden, meta = self._forward(first, 0, None, {})
        rows = [meta.query_start_loc_cpu[i + 1] - 1 for i, e in enumerate(first) if e.do_sample]
        drafts = [self._argmax(hidden[torch.tensor(rows, device=self.device)])]
        last_rows = {e.seq_id: i for i, (e, _) in enumerate(sampling)}
        for j in range(1, self.k):
            step = [
                ScheduledSequence(e.seq_id, [-1], pos + j - 1, e.block_table, None, True)
                for e, pos in sampling
            ]
            hidden, _ = self._forward(step, j & 1, drafts[-1], last_rows)
            drafts.append(self._argmax(hidden))
        proposals = torch.stack(drafts, dim=1).tolist()
        return {e.seq_id: p for (e, _), p in zip(sampling, proposals)}

    def _forward(self, scheduled, parity, last_sampled, last_rows):
        input_ids, positions, meta = self.inputs.build(scheduled, parity, last_sampled, last_rows)
        with tensor_parallel_forward():
            return self.model(input_ids, positions, meta, None), meta

    def _argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.compute_logits(hidden).argmax(dim=-1)


def step_tokens(
    scheduled: list[ScheduledSequence], result: ModelRunnerOutput, device: torch.device
) -> dict[str, list[int]]:
    """Each sampling sequence's tokens of this step (accepted proposals + the target's own). Only the
    sampler rank has them; with tensor parallelism it broadcasts them to the other ranks."""
    tokens = {**{sid: [t] for sid, t in result.sampled.items()}, **result.spec_token_ids}
    st = get_parallel_state()
    if st.tp_size == 1:
        return tokens
    entries = [e for e in scheduled if e.do_sample]
    width = 2 + max((e.num_spec_tokens for e in entries), default=0)
    buf = torch.zeros(len(entries), width, dtype=torch.int64, device=device)
    if st.tp_rank == 0:
        host = torch.zeros(len(entries), width, dtype=torch.int64)
        for i, e in enumerate(entries):
            toks = tokens[e.seq_id]
            host[i, 0] = len(toks)
            host[i, 1 : 1 + len(toks)] = torch.tensor(toks)
        buf.copy_(host)
    torch.distributed.broadcast(buf, src=st.pp_rank * st.tp_size, group=st.tp_group)
    rows = buf.tolist()
    return {e.seq_id: row[1 : 1 + row[0]] for e, row in zip(entries, rows)}
