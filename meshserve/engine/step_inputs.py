"""Batch preparation: one step's flat token batch and its AttentionMetadata, on the device.

Built with numpy over the scheduled sequences (no per-token Python) and moved in one copy. On a GPU that
copy goes through a reused pinned buffer (the fast path); elsewhere the numpy array is used as it is.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.kernels.attention_metadata import AttentionMetadata


class StepInputBuilder:
    """Builds (input_ids, positions, AttentionMetadata) for a list of scheduled sequences.

    Holds num_buffers pinned host buffers, used in turn by step parity: with async scheduling step n+1 is
    prepared while step n's copies may still be queued behind step n-1 on the GPU. A buffer is reused only
    once the copy that last read it has run.
    """

    def __init__(self, block_size: int, device: torch.device, num_buffers: int = 2):
        self.block_size = block_size
        self.device = device
        self._pinned: list[torch.Tensor | None] = [None] * num_buffers
        self._pinned_copied: list[torch.cuda.Event | None] = [None] * num_buffers  # each buffer's last copy

    def build(self, scheduled: list[ScheduledSequence], parity: int, last_sampled: torch.Tensor | None,
              last_rows: dict[str, int], last_rejected: torch.Tensor | None = None):
        """Flat batch tensors for the step. Pending tokens (-1, async scheduling) are filled on the device
        from last_sampled, the previous step's sampled ids, at the rows last_rows gives by sequence. A
        sequence scheduled behind its own verify step (num_unverified_tokens) moves back on the device by
        the proposals that step rejected (last_rejected, same rows): positions, KV slots, sequence length;
        max_seq_len stays the host's bound (all accepted)."""
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
        # pending tokens (-1, async scheduling) are the previous step's samples, still on the device (none given:
        # a later pipeline stage, which embeds no tokens, leaves them)
        holes = np.flatnonzero(input_ids < 0) if last_sampled is not None else np.zeros(0, dtype=np.int64)
        sources = np.fromiter((last_rows[scheduled[r].seq_id] for r in row[holes]), dtype=np.int64,
                              count=holes.shape[0])
        # rows behind a verify step still in flight: their tokens, and where each row's rejected count is
        behind = np.fromiter((r for r, s in enumerate(scheduled) if s.num_unverified_tokens), dtype=np.int64)
        behind_src = np.fromiter((last_rows[scheduled[r].seq_id] for r in behind), dtype=np.int64,
                                 count=behind.shape[0])
        behind_tok = np.flatnonzero(np.isin(row, behind)) if behind.shape[0] else behind
        # one host buffer, one async copy from pinned memory; views split it on the device. Every part
        # starts 16-byte aligned: Triton specialises kernels on pointer alignment, so an odd offset would
        # compile a second variant of each kernel in the middle of serving.
        parts = [input_ids, positions, slots, qsl, seq_lens, tables.reshape(-1), holes, sources, behind, behind_src,
                 behind_tok]
        offsets = np.zeros(len(parts) + 1, dtype=np.int64)
        np.cumsum([p.shape[0] + (p.shape[0] & 1) for p in parts], out=offsets[1:])
        host = np.zeros(int(offsets[-1]), dtype=np.int64)
        for p, start in zip(parts, offsets):
            host[start : start + p.shape[0]] = p
        buf = self._to_device(host, parity)
        ids_d, pos_d, slots_d, qsl_d, seq_lens_d, tables_d, holes_d, sources_d, behind_d, src_d, tok_d = (
            buf[int(start) : int(start) + p.shape[0]] for p, start in zip(parts, offsets))
        if holes.shape[0]:
            ids_d.index_copy_(0, holes_d, last_sampled.index_select(0, sources_d))
        seq_lens_cpu = seq_lens
        if behind.shape[0]:
            back = torch.zeros(len(scheduled), dtype=torch.int64, device=ids_d.device)
            back.index_copy_(0, behind_d, last_rejected.index_select(0, src_d))
            seq_lens_d.sub_(back)
            tok_row = torch.searchsorted(qsl_d, tok_d, right=True) - 1  # each such token's row
            pos = pos_d.index_select(0, tok_d) - back.index_select(0, tok_row)
            pos_d.index_copy_(0, tok_d, pos)
            width_d = tables_d.view(len(scheduled), width)
            slots_d.index_copy_(0, tok_d, width_d[tok_row, pos // bsz] * bsz + pos % bsz)
            if self.device.type != "cuda":  # reference kernels loop over host lengths; reading is free here
                seq_lens_cpu = seq_lens_d.numpy()
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d.view(len(scheduled), width),
            max_query_len=int(num_new.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=seq_lens_cpu.tolist(),
            query_lens_cpu=num_new.tolist(),
        )
        return ids_d, pos_d, meta

    def _to_device(self, host: np.ndarray, parity: int) -> torch.Tensor:
        """Copy an int64 array to the device through a reused pinned buffer (no per-step pinning)."""
        if self.device.type != "cuda":
            return torch.from_numpy(host)
        n = host.shape[0]
        i = parity
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
