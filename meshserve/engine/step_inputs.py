"""Batch preparation: one step's flat token batch and its AttentionMetadata, on the device.

Built with numpy over the scheduled sequences (no per-token Python), or with plain lists for a few one-token
rows (batch-1 decode, where numpy's cost per call dominates), and moved in one copy. On a GPU that copy goes
through a reused pinned buffer (the fast path); elsewhere the numpy array is used as it is.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from meshserve.engine.scheduler_output import ScheduledSequence
from meshserve.kernels.attention_metadata import AttentionMetadata

_PAD = np.zeros(1, dtype=np.int64)
_PAD_LIST = [0]
SMALL_DECODE_ROWS = 8  # up to this many one-token rows, StepInputBuilder builds the step with plain lists


def _split_sizes(lengths) -> list[int]:
    """One host buffer, one async copy from pinned memory; one split cuts it into views on the device. Every
    part starts 16-byte aligned: Triton specialises kernels on pointer alignment, so an odd offset would
    compile a second variant of each kernel in the middle of serving. So an odd-length part is followed by
    one pad element, and each part's pad (possibly empty) is a split piece of its own: the parts are the
    even pieces."""
    sizes = []
    for n in lengths:
        sizes += (n, n & 1)
    return sizes


def _packed(parts: list[np.ndarray]) -> np.ndarray:
    """The parts in one int64 buffer, laid out as _split_sizes cuts it."""
    pieces = []
    for p in parts:
        pieces += (p, _PAD[: p.shape[0] & 1])
    return np.concatenate(pieces)


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
        if len(scheduled) <= SMALL_DECODE_ROWS and all(len(s.token_ids) == 1 and not s.num_unverified_tokens
                                                        for s in scheduled):
            host, sizes, lens = self._small_decode_parts(scheduled, last_sampled, last_rows)
        else:
            host, sizes, lens = self._parts(scheduled, last_sampled, last_rows)
        num_new, qsl, seq_lens, width, max_query_len, max_seq_len, has_holes, has_behind = lens
        buf = self._to_device(host, parity)
        ids_d, pos_d, slots_d, qsl_d, seq_lens_d, tables_d, holes_d, sources_d, behind_d, src_d, tok_d = (
            buf.split(sizes)[::2])
        bsz = self.block_size
        if has_holes:
            ids_d.index_copy_(0, holes_d, last_sampled.index_select(0, sources_d))
        seq_lens_cpu = seq_lens
        if has_behind:
            back = torch.zeros(len(scheduled), dtype=torch.int64, device=ids_d.device)
            back.index_copy_(0, behind_d, last_rejected.index_select(0, src_d))
            seq_lens_d.sub_(back)
            tok_row = torch.searchsorted(qsl_d, tok_d, right=True) - 1  # each such token's row
            pos = pos_d.index_select(0, tok_d) - back.index_select(0, tok_row)
            pos_d.index_copy_(0, tok_d, pos)
            width_d = tables_d.view(len(scheduled), width)
            slots_d.index_copy_(0, tok_d, width_d[tok_row, pos // bsz] * bsz + pos % bsz)
            if self.device.type != "cuda":  # reference kernels loop over host lengths; reading is free here
                seq_lens_cpu = seq_lens_d.tolist()
        meta = AttentionMetadata(
            slot_mapping=slots_d,
            query_start_loc=qsl_d,
            seq_lens=seq_lens_d,
            block_tables=tables_d.view(len(scheduled), width),
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            query_start_loc_cpu=qsl,
            seq_lens_cpu=seq_lens_cpu,
            query_lens_cpu=num_new,
        )
        return ids_d, pos_d, meta

    def _parts(self, scheduled: list[ScheduledSequence], last_sampled: torch.Tensor | None,
               last_rows: dict[str, int]):
        """The step's flat host buffer, its split sizes and host lists, built with numpy over the rows (no
        per-token Python): any step."""
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
        parts = [input_ids, positions, slots, qsl, seq_lens, tables.reshape(-1), holes, sources, behind, behind_src,
                 behind_tok]
        return _packed(parts), _split_sizes(p.shape[0] for p in parts), (
            num_new.tolist(), qsl.tolist(), seq_lens.tolist(), width, int(num_new.max()), int(seq_lens.max()),
            bool(holes.shape[0]), bool(behind.shape[0]))

    def _small_decode_parts(self, scheduled: list[ScheduledSequence], last_sampled: torch.Tensor | None,
                            last_rows: dict[str, int]):
        """_parts for a few rows of one new token each (no verify step in flight): plain Python lists, as
        numpy's fixed cost per call is most of a batch-1 step's preparation (W1; the same buffer, sizes and
        lists as _parts, tests/engine/test_step_inputs.py)."""
        bsz = self.block_size
        n = len(scheduled)
        ids = [s.token_ids[0] for s in scheduled]
        positions = [s.num_computed_tokens for s in scheduled]
        slots = [s.block_table[p // bsz] * bsz + p % bsz for s, p in zip(scheduled, positions)]
        seq_lens = [p + 1 for p in positions]
        width = max(len(s.block_table) for s in scheduled)
        tables = np.zeros((n, width), dtype=np.int64)
        for i, s in enumerate(scheduled):
            tables[i, : len(s.block_table)] = s.block_table
        holes = [i for i, t in enumerate(ids) if t < 0] if last_sampled is not None else []
        sources = [last_rows[scheduled[i].seq_id] for i in holes]
        qsl = list(range(n + 1))
        head = []  # the parts before the tables, each padded to an even length
        for part in (ids, positions, slots, qsl, seq_lens):
            head += part
            head += _PAD_LIST[: len(part) & 1]
        tail = _PAD_LIST[: (n * width) & 1] + holes + _PAD_LIST[: len(holes) & 1] + sources + _PAD_LIST[: len(sources) & 1]
        host = np.concatenate((np.array(head, dtype=np.int64), tables.reshape(-1), np.array(tail, dtype=np.int64)))
        sizes = _split_sizes((n, n, n, n + 1, n, n * width, len(holes), len(sources), 0, 0, 0))
        return host, sizes, ([1] * n, qsl, seq_lens, width, 1, max(seq_lens), bool(holes), False)

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
