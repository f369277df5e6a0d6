"""Runs the model for one scheduler step: builds the flat batch, owns the paged KV memory, samples.

Every rank of a split model will hold one ModelRunner; the last one samples. Host-side preparation is
done with Python lists once per step and copied to the device in one go per tensor.
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from meshserve.config import EngineConfig
from meshserve.distributed.parallel_state import get_parallel_state
from meshserve.distributed.pipeline import recv_activations, send_activations
from meshserve.engine.cuda_graph import DecodeGraphs
from meshserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from meshserve.layers.attention import get_attention_backend
from meshserve.layers.attention_metadata import AttentionMetadata
from meshserve.layers.pipeline import IntermediateTensors
from meshserve.layers.sampler import Sampler, SamplingMetadata, compute_logprobs
from meshserve.models.loader import ModelSource, build_model, weight_bytes

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
    # pipeline parallel: this stage's compute time and the step's wall time (for the bubble)
    busy_s: float = 0.0
    wall_s: float = 0.0


class PendingOutput:
    """A launched step whose sampled ids are on their way to pinned host memory; result() waits for them.

    Lets the engine schedule and launch step n+1 before it reads step n's tokens (async scheduling).
    """

    def __init__(self, output: ModelRunnerOutput, seq_ids: list[str] | None = None,
                 host_ids: torch.Tensor | None = None, event: torch.cuda.Event | None = None,
                 sampled=None, logprob_ks: list[int | None] | None = None):
        self._output = output
        self._seq_ids, self._host_ids, self._event = seq_ids, host_ids, event
        self._sampled, self._logprob_ks = sampled, logprob_ks

    def result(self) -> ModelRunnerOutput:
        if self._seq_ids is not None:
            if self._event is not None:
                self._event.synchronize()
            out = self._output
            out.sampled.update(zip(self._seq_ids, self._host_ids.tolist()))
            sampled = self._sampled
            if sampled is not None and sampled.logprobs is not None:
                infos = _to_token_logprobs(sampled.sampled_token_ids, sampled.logprobs, sampled.ranks,
                                           sampled.top_token_ids, sampled.top_logprobs)
                for seq_id, k, info in zip(self._seq_ids, self._logprob_ks, infos):
                    if k is not None:
                        info.top_ids, info.top_logprobs = info.top_ids[:k], info.top_logprobs[:k]
                        out.logprobs[seq_id] = info
            self._seq_ids = self._sampled = None
        return self._output


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
        self.graphs: DecodeGraphs | None = None
        # two of each pinned buffer, used in turn: with async scheduling step n+1 is prepared while step
        # n's copies may still be queued behind step n-1 on the GPU
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._pinned_copied: list[torch.cuda.Event | None] = [None, None]  # each buffer's last copy
        self._pinned_ids: list[torch.Tensor | None] = [None, None]
        self._step_parity = 0
        # the last step's sampled ids on the device and their rows, by sequence: the next step's input
        # for tokens that were still pending when it was scheduled
        self._last_sampled: torch.Tensor | None = None
        self._last_rows: dict[str, int] = {}

    def param_bytes(self) -> int:
        """Bytes of this rank's weights (shared tensors once)."""
        return weight_bytes(self.model)

    # -- KV memory -------------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        mc = self.config.model_config
        elem = torch.tensor([], dtype=self.dtype).element_size()
        num_layers = len(self.model.attention_layers())  # this pipeline stage's layers
        return 2 * num_layers * self.block_size * self.attn_kv_heads() * mc.head_dim * elem

    def attn_kv_heads(self) -> int:
        return self.model.attention_layers()[0].num_kv_heads

    def determine_num_blocks_all(self) -> int:
        """determine_num_blocks agreed over every rank (the smallest), so all stages hold the same pool."""
        n = self.determine_num_blocks()
        st = get_parallel_state()
        if st.world_size > 1:
            t = torch.tensor([n], dtype=torch.int64)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN, group=st.cpu_group)
            n = int(t.item())
        return n

    def determine_num_blocks(self) -> int:
        """How many KV blocks the memory budget allows (or the override)."""
        cc, sc = self.config.cache_config, self.config.scheduler_config
        if cc.num_gpu_blocks_override is not None:
            return cc.num_gpu_blocks_override
        per_block = self.kv_bytes_per_block()
        if self.device.type == "cuda":
            peak = self.profile_peak_memory()
            free, total = torch.cuda.mem_get_info(self.device)
            # memory held outside torch's allocator (CUDA context, NCCL, other processes) stays reserved
            non_torch = (total - free) - torch.cuda.memory_reserved(self.device)
            budget = int(total * cc.gpu_memory_utilization) - peak - max(non_torch, 0)
            logger.info("GPU memory: total %.1f GiB x %.2f; weights + peak activations %.2f GiB; "
                        "outside torch %.2f GiB; KV budget %.2f GiB", total / 2**30, cc.gpu_memory_utilization,
                        peak / 2**30, non_torch / 2**30, budget / 2**30)
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

    @torch.inference_mode()
    def warm_up_prefill(self, num_blocks: int) -> None:
        """Compile the prefill kernels for every query-length bucket now, not on a user's first request
        (each JIT costs ~0.3 s of TTFT). Writes only to cache blocks no sequence owns yet."""
        if get_parallel_state().pp_size > 1:
            return  # stages would need their neighbours; the first real steps compile instead
        t0 = time.perf_counter()
        limit = min(512, self.config.scheduler_config.max_num_batched_tokens)
        q = 2
        while q <= limit:
            blocks = -(-q // self.block_size)
            if blocks > num_blocks:
                break
            seq = ScheduledSequence(seq_id="warmup", token_ids=[0] * q, num_computed_tokens=0,
                                    block_table=list(range(blocks)), params=None, do_sample=False)
            input_ids, positions, meta = self._prepare([seq])
            self.model(input_ids, positions, meta)
            q *= 2
        torch.cuda.synchronize(self.device)
        logger.info("prefill kernels warmed up in %.1f s", time.perf_counter() - t0)

    @torch.inference_mode()
    def profile_peak_memory(self) -> int:
        """Peak bytes of a largest-size step (weights included): max_num_batched_tokens of prefill spread
        over up to max_num_seqs sequences, plus their logits, run against a throwaway KV cache."""
        sc = self.config.scheduler_config
        tokens = min(sc.max_num_batched_tokens, sc.max_num_seqs * sc.max_model_len)
        num_seqs = min(sc.max_num_seqs, tokens)
        per_seq = [tokens // num_seqs + (1 if i < tokens % num_seqs else 0) for i in range(num_seqs)]
        blocks_per_seq = [-(-n // self.block_size) for n in per_seq]
        self.allocate_kv_cache(sum(blocks_per_seq), capture_graphs=False)
        scheduled, next_block = [], 0
        for i, (n, nb) in enumerate(zip(per_seq, blocks_per_seq)):
            table = list(range(next_block, next_block + nb))
            next_block += nb
            scheduled.append(ScheduledSequence(seq_id=f"profile{i}", token_ids=[0] * n, num_computed_tokens=0,
                                               block_table=table, params=None, do_sample=False))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        input_ids, positions, meta = self._prepare(scheduled)
        st = get_parallel_state()
        intermediate = None
        if not st.is_first_stage:  # stand-in activations of the right size
            h = torch.zeros(input_ids.shape[0], self.config.model_config.hf_config.hidden_size,
                            dtype=self.dtype, device=self.device)
            intermediate = IntermediateTensors(h, h.clone())
        hidden = self.model(input_ids, positions, meta, intermediate)
        if st.is_last_stage:
            last = meta.query_start_loc[1:].long() - 1
            self.model.compute_logits(hidden[last]).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        self.kv_caches = []
        torch.cuda.empty_cache()
        # the profile cache itself is not activation memory
        return peak - sum(blocks_per_seq) * self.kv_bytes_per_block()

    def allocate_kv_cache(self, num_blocks: int, capture_graphs: bool = True) -> None:
        mc = self.config.model_config
        shape = (2, num_blocks, self.block_size, self.attn_kv_heads(), mc.head_dim)
        self.kv_caches = []
        backend = get_attention_backend(self.device)
        for layer in self.model.attention_layers():
            layer.backend = backend
            layer.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            self.kv_caches.append(layer.kv_cache)
        if capture_graphs:
            logger.info("KV cache: %d blocks of %d tokens (%.2f GiB)", num_blocks, self.block_size,
                        num_blocks * self.kv_bytes_per_block() / 2**30)
        if capture_graphs and self.device.type == "cuda":
            self.warm_up_prefill(num_blocks)
        if capture_graphs and self.device.type == "cuda" and not self.config.enforce_eager \
                and backend.name == "triton":
            sc = self.config.scheduler_config
            self.graphs = DecodeGraphs(self.model, sc.max_num_seqs, sc.max_model_len, self.block_size, self.device)
            self.graphs.capture()

    # -- one step --------------------------------------------------------------------------------
    def _prepare(self, scheduled: list[ScheduledSequence]):
        """Flat batch tensors for the step, built with numpy (no per-token Python) and moved in one copy."""
        bsz = self.block_size
        num_new = np.fromiter((s.num_new_tokens for s in scheduled), dtype=np.int64, count=len(scheduled))
        starts = np.fromiter((s.num_computed_tokens for s in scheduled), dtype=np.int64, count=len(scheduled))
        qsl = np.zeros(len(scheduled) + 1, dtype=np.int64)
        np.cumsum(num_new, out=qsl[1:])
        total = int(qsl[-1])
        seq_lens = starts + num_new
        table_lens = np.fromiter((len(s.block_table) for s in scheduled), dtype=np.int64, count=len(scheduled))
        width = int(table_lens.max())
        tables = np.zeros((len(scheduled), width), dtype=np.int64)
        flat = np.fromiter(itertools.chain.from_iterable(s.block_table for s in scheduled), dtype=np.int64,
                           count=int(table_lens.sum()))
        table_row = np.repeat(np.arange(len(scheduled)), table_lens)
        table_starts = np.cumsum(table_lens) - table_lens
        tables[table_row, np.arange(flat.shape[0]) - table_starts[table_row]] = flat
        row = np.repeat(np.arange(len(scheduled)), num_new)
        positions = np.arange(total) - qsl[:-1][row] + starts[row]
        slots = tables[row, positions // bsz] * bsz + positions % bsz
        input_ids = np.fromiter(itertools.chain.from_iterable(s.token_ids for s in scheduled), dtype=np.int64,
                                count=total)
        # pending tokens (-1, async scheduling) are the previous step's samples, still on the device
        holes = np.flatnonzero(input_ids < 0)
        sources = np.fromiter((self._last_rows[scheduled[r].seq_id] for r in row[holes]), dtype=np.int64,
                              count=holes.shape[0])
        # one host buffer, one async copy from pinned memory; views split it on the device. Every part
        # starts 16-byte aligned: Triton specialises kernels on pointer alignment, so an odd offset would
        # compile a second variant of each kernel in the middle of serving.
        parts = [input_ids, positions, slots, qsl, seq_lens, tables.reshape(-1), holes, sources]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.shape[0] + (p.shape[0] & 1) for p in parts], out=offsets[1:])
        host = np.zeros(int(offsets[-1]), dtype=np.int64)
        for p, start in zip(parts, offsets):
            host[start : start + p.shape[0]] = p
        buf = self._to_device(host)
        ids_d, pos_d, slots_d, qsl_d, seq_lens_d, tables_d, holes_d, sources_d = (
            buf[int(start) : int(start) + p.shape[0]] for p, start in zip(parts, offsets))
        if holes.shape[0]:
            ids_d.index_copy_(0, holes_d, self._last_sampled.index_select(0, sources_d))
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d.view(len(scheduled), width),
            max_query_len=int(num_new.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens.tolist(),
        )
        return ids_d, pos_d, meta

    def _to_device(self, host: np.ndarray) -> torch.Tensor:
        """Copy an int64 array to the device through a reused pinned buffer (no per-step pinning)."""
        if self.device.type != "cuda":
            return torch.from_numpy(host)
        n = host.shape[0]
        i = self._step_parity
        if self._pinned_copied[i] is not None:
            # the copy that last read this buffer must have run (in a step loop it did long ago; warm-up
            # loops prepare batches faster than the GPU consumes them)
            self._pinned_copied[i].synchronize()
        if self._pinned[i] is None or self._pinned[i].shape[0] < n:
            self._pinned[i] = torch.empty(max(n, 1 << 16), dtype=torch.int64, pin_memory=True)
        pinned = self._pinned[i]
        pinned[:n].numpy()[:] = host
        out = pinned[:n].to(self.device, non_blocking=True)
        self._pinned_copied[i] = torch.cuda.Event()
        self._pinned_copied[i].record()
        return out

    def _generator(self, s: ScheduledSequence) -> torch.Generator | None:
        if s.params.seed is None or s.params.greedy:
            return None
        gen = self.generators.get(s.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device).manual_seed(s.params.seed)
            self.generators[s.seq_id] = gen
        return gen

    def execute(self, out: SchedulerOutput) -> ModelRunnerOutput:
        """Run this rank's part of the step. Only the sampler rank's output carries tokens."""
        return self.launch(out).result()

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> PendingOutput:
        """Queue the step on the device and return without waiting for its sampled tokens."""
        for seq_id in out.finished_seq_ids:
            self.generators.pop(seq_id, None)
        if out.is_empty:
            return PendingOutput(ModelRunnerOutput())
        self._step_parity ^= 1
        st = get_parallel_state()
        if st.pp_size == 1:
            input_ids, positions, meta = self._prepare(out.scheduled)
            if self.graphs is not None and self.graphs.can_run(meta):
                hidden = self.graphs.run(input_ids, positions, meta)
            else:
                hidden = self.model(input_ids, positions, meta)
            return self._logits_and_sample(out.scheduled, hidden, meta)
        return PendingOutput(self._execute_pipeline(out.scheduled, st))

    def _execute_pipeline(self, scheduled: list[ScheduledSequence], st) -> ModelRunnerOutput:
        """Split the step into micro-batches and stream them through the stages: while stage s works on
        micro-batch m, stage s+1 works on m-1, so the bubble shrinks to (S-1)/(M+S-1)."""
        t0 = time.perf_counter()
        busy = 0.0
        num_mb = min(st.pp_size, len(scheduled))
        bounds = [len(scheduled) * i // num_mb for i in range(num_mb + 1)]
        hidden_size = self.config.model_config.hf_config.hidden_size
        result, pending = ModelRunnerOutput(), []
        for m in range(num_mb):
            mb = scheduled[bounds[m] : bounds[m + 1]]
            input_ids, positions, meta = self._prepare(mb)
            intermediate = None
            if not st.is_first_stage:
                shape = (input_ids.shape[0], hidden_size)
                hidden, residual = recv_activations([shape, shape], self.dtype, self.device)
                intermediate = IntermediateTensors(hidden, residual)
            t = time.perf_counter()
            hidden = self.model(input_ids, positions, meta, intermediate)
            if st.is_last_stage:
                part = self._logits_and_sample(mb, hidden, meta).result()
                result.sampled.update(part.sampled)
                result.logprobs.update(part.logprobs)
                result.prompt_logprobs.update(part.prompt_logprobs)
            else:
                if self.device.type == "cuda":
                    torch.cuda.current_stream(self.device).synchronize()
                pending += send_activations([hidden.hidden, hidden.residual])
            busy += time.perf_counter() - t
        for work in pending:
            work.wait()
        result.busy_s, result.wall_s = busy, time.perf_counter() - t0
        return result

    def _logits_and_sample(self, scheduled: list[ScheduledSequence], hidden: torch.Tensor,
                           meta: AttentionMetadata) -> PendingOutput:
        """Logits for sampling rows and prompt-logprob rows; sampling on TP rank 0 only (the LM head's
        all-gather needs every TP rank, the sampler does not). Sampled ids come back asynchronously."""
        result = ModelRunnerOutput()
        samples = get_parallel_state().tp_rank == 0
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
            logits = self.model.compute_logits(hidden[qsl[i] : qsl[i] + (end - start)])
            if samples:
                next_ids = torch.tensor(s.prompt_token_ids[start + 1 : end + 1], device=self.device)
                lps = compute_logprobs(logits, next_ids, k)
                result.prompt_logprobs[s.seq_id] = (start, _to_token_logprobs(next_ids, *lps))

        sample_idx = [i for i, s in enumerate(scheduled) if s.do_sample]
        if not sample_idx:
            return PendingOutput(result)
        if len(sample_idx) == len(scheduled):  # the usual case: no host-to-device copy needed
            last_rows = meta.query_start_loc[1:] - 1
        else:
            last_rows = torch.tensor([qsl[i + 1] - 1 for i in sample_idx], device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, last_rows))
        if not samples:
            return PendingOutput(result)
        rows = [scheduled[i] for i in sample_idx]
        banned = [sorted(s.params._all_stop_token_ids) if s.num_output_tokens < s.params.min_tokens else []
                  for s in rows]
        if all(s.params.greedy and s.params.logprobs is None and not s.params.uses_penalties for s in rows) \
                and not any(banned):
            # plain greedy: no per-row settings to upload, just the argmax
            return self._pending(result, rows, logits.argmax(dim=-1))
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
        return self._pending(result, rows, sampled.sampled_token_ids, sampled)

    def _pending(self, result: ModelRunnerOutput, rows: list[ScheduledSequence], token_ids: torch.Tensor,
                 sampled=None) -> PendingOutput:
        """Remember the sampled ids on the device (the next step may need them as inputs) and start their
        copy to pinned host memory."""
        token_ids = token_ids.long()
        self._last_sampled = token_ids
        self._last_rows = {s.seq_id: i for i, s in enumerate(rows)}
        seq_ids = [s.seq_id for s in rows]
        ks = [s.params.logprobs for s in rows] if sampled is not None and sampled.logprobs is not None else None
        if self.device.type != "cuda":
            return PendingOutput(result, seq_ids, token_ids, None, sampled, ks)
        i, n = self._step_parity, token_ids.shape[0]
        if self._pinned_ids[i] is None or self._pinned_ids[i].shape[0] < n:
            self._pinned_ids[i] = torch.empty(max(n, 256), dtype=torch.int64, pin_memory=True)
        host = self._pinned_ids[i][:n]
        host.copy_(token_ids, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return PendingOutput(result, seq_ids, host, event, sampled, ks)
