"""Runs the model for one scheduler step: builds the flat batch, owns the paged KV memory, samples.

Every rank of a split model will hold one ModelRunner; the last one samples. Host-side preparation is
done with Python lists once per step and copied to the device in one go per tensor.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from meshserve.config import EngineConfig
from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from meshserve.layers.attention import get_attention_backend
from meshserve.layers.attention_metadata import AttentionMetadata
from meshserve.layers.sampler import Sampler, SamplingMetadata, compute_logprobs
from meshserve.models.loader import ModelSource, build_model

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class TokenLogprobs:
    """Logprob information of one position: the token taken and the top alternatives."""

    token_id: int
    logprob: float
    rank: int
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # seq_id -> (chunk start position, logprobs of prompt tokens start+1, start+2, ... scored in this chunk)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)


def _to_token_logprobs(ids, lps, ranks, top_ids, top_lps) -> list[TokenLogprobs]:
    return [TokenLogprobs(i, lp, r, ti, tl) for i, lp, r, ti, tl in
            zip(ids.tolist(), lps.tolist(), ranks.tolist(), top_ids.tolist(), top_lps.tolist())]


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource):
        self.config = config
        mc = config.model_config
        self.device = torch.device(config.device)
        self.dtype = _DTYPES[mc.dtype]
        self.block_size = config.cache_config.block_size
        self.vocab_size = mc.vocab_size
        torch.manual_seed(mc.seed)
        self.model = build_model(source, self.dtype, self.device, mc.max_model_len, seed=mc.seed)
        self.sampler = Sampler()
        self.kv_caches: list[torch.Tensor] = []
        self.generators: dict[str, torch.Generator] = {}

    # -- KV memory -------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        mc = self.config.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * self.attn_kv_heads() * mc.head_dim * elem

    def attn_kv_heads(self) -> int:
        return self.model.attention_layers()[0].num_kv_heads

    def determine_num_blocks(self) -> int:
        """How many KV blocks the memory budget allows (or the override)."""
        cc, sc = self.config.cache_config, self.config.scheduler_config
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            # activation workspace for the largest step, with a safety factor; the GPU path refines this
            hc = self.config.model_config.hf_config
            width = max(hc.intermediate_size * 2, hc.vocab_size // 8, hc.hidden_size * 4)
            workspace = 4 * sc.max_num_batched_tokens * width * 4
            budget = int(total * cc.gpu_memory_utilization) - used - workspace
            logger.info("GPU memory: total %.1f GiB, in use %.1f GiB, workspace %.1f GiB",
                        total / 2**30, used / 2**30, workspace / 2**30)
        else:
            budget = cc.cpu_kv_cache_bytes
            # a CPU pool never needs more than every sequence at full length
            needed = sc.max_num_seqs * (-(-sc.max_model_len // self.block_size)) * per_block
            budget = min(budget, needed)
        num_blocks = budget // per_block
        if num_blocks < 1:
            raise RuntimeError(f"no memory left for the KV cache (budget {budget} bytes, "
                               f"{per_block} bytes per block)")
        return int(num_blocks)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.config.model_config
        shape = (2, num_blocks, self.block_size, self.attn_kv_heads(), mc.head_dim)
        self.kv_caches = []
        backend = get_attention_backend(self.device)
        for layer in self.model.attention_layers():
            layer.backend = backend
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append(layer.kv_cache)
        logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                    num_blocks * self.kv_bytes_per_block() / 2**30)

    # -- one step --------------------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledSequence]):
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl = [0]
        seq_lens: list[int] = []
        bs = self.block_size
        for s in scheduled:
            start, n = s.num_computed_tokens, s.num_new_tokens
            input_ids.extend(s.token_ids)
            pos = range(start, start + n)
            positions.extend(pos)
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            qsl.append(qsl[-1] + n)
            seq_lens.append(start + n)
        width = max(len(s.block_table) for s in scheduled)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in scheduled]
        dev = self.device

        def t(x, dtype):
            return torch.tensor(x, dtype=dtype).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=t(slots, torch.int64),
            query_start_loc=t(qsl, torch.int32),
            seq_lens=t(seq_lens, torch.int32),
            block_tables=t(tables, torch.int32),
            max_query_len=max(s.num_new_tokens for s in scheduled),
            max_seq_len=max(seq_lens),
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens,
        )
        return t(input_ids, torch.int64), t(positions, torch.int64), meta

    def _generator(self, s: ScheduledSequence) -> torch.Generator | None:
        if s.params.seed is None or s.params.greedy:
            return None
        gen = self.generators.get(s.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(s.params.seed)
            self.generators[s.seq_id] = gen
        return gen

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        for seq_id in out.finished_seq_ids:
            self.generators.pop(seq_id, None)
        result = ModelRunnerOutput()
        if out.is_empty:
            return result
        scheduled = out.scheduled
        input_ids, positions, meta = self._prepare(scheduled)
        hidden = self.model(input_ids, positions, meta)
        qsl = meta.query_start_loc_cpu

        # prompt logprobs: logits at prompt position j score prompt token j + 1
        for i, s in enumerate(scheduled):
            k = s.params.prompt_logprobs
            if k is None or s.num_computed_tokens >= s.num_prompt_tokens:
                continue
            start = s.num_computed_tokens
            end = min(start + s.num_new_tokens, s.num_prompt_tokens - 1)
            if end <= start:
                continue
            rows = hidden[qsl[i] : qsl[i] + (end - start)]
            next_ids = torch.tensor(s.prompt_token_ids[start + 1 : end + 1], device=self.device)
            lps = compute_logprobs(self.model.compute_logits(rows), next_ids, k)
            result.prompt_logprobs[s.seq_id] = (start, _to_token_logprobs(next_ids, *lps))

        sample_idx = [i for i, s in enumerate(scheduled) if s.do_sample]
        if not sample_idx:
            return result
        last_rows = torch.tensor([qsl[i + 1] - 1 for i in sample_idx], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last_rows))
        rows = [scheduled[i] for i in sample_idx]
        banned = [sorted(s.params._all_stop_token_ids) if s.num_output_tokens < s.params.min_tokens else []
                  for s in rows]
        meta_s = SamplingMetadata.build(
            [s.params for s in rows],
            [s.prompt_token_ids or [] for s in rows],
            [s.output_token_ids or [] for s in rows],
            [self._generator(s) for s in rows],
            self.vocab_size,
            self.device,
            banned_token_ids=banned,
        )
        sampled = self.sampler(logits, meta_s)
        token_ids = sampled.sampled_token_ids.tolist()
        for s, tok in zip(rows, token_ids):
            result.sampled[s.seq_id] = tok
        if sampled.logprobs is not None:
            infos = _to_token_logprobs(sampled.sampled_token_ids, sampled.logprobs, sampled.ranks,
                                       sampled.top_token_ids, sampled.top_logprobs)
            for s, info in zip(rows, infos):
                k = s.params.logprobs
                if k is not None:
                    info.top_ids, info.top_logprobs = info.top_ids[:k], info.top_logprobs[:k]
                    result.logprobs[s.seq_id] = info
        return result
