"""Layer-wise KV transfer: the producer sends each layer's new blocks as its forward finishes them.

Producer: a consumer subscribes to a transfer (a Pull with layerwise set), before, during or after the
prefill. The runner's per-layer hook (layer_hook.py) gathers the blocks a step completed, layer by layer, on
the compute stream, and queues them here; this module's sender thread waits for each layer's event (GPU: the
compute stream has reached it, so the send overlaps the next layers) and sends a LayerSent header on the
consumer's stream socket, then the tensor over the transport; after the last layer, a StreamDone with the
first token. A FIFO per connector keeps headers and tensors in one order on every link.
Consumer: the receiver thread subscribes, receives each announced layer straight into the request's blocks,
counts the blocks of every layer, and reports "received" only when StreamDone comes and every layer holds
every block; a missing layer, a refusal or the deadline (transfer_timeout_s) reports "failed" instead, and
the producer is told (Ack not ok) so it frees the blocks. Tensors announced for a request already given up
are received all the same (into a scratch buffer) so the link keeps its order.
One-sided transports (NIXL, `one_sided_read`): the same flow, but no tensor travels from the producer. The
hook gathers nothing; each LayerSent, sent once the layer's event is reached, names the producer's blocks of
that layer, and the receiver READs them straight into the request's blocks (`_read_layer`) before taking the
next message. The consumer alone writes its blocks, so giving up (a missing layer, the deadline) needs nothing
from the producer, and a read NIXL cannot cancel retires the blocks (as a whole-request pull does). The
producer sees no bytes move: its overlap metric comes from the consumer's Ack, which says when the reads ran.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import zmq

from meshserve.disagg import side_channel as sc
from meshserve.disagg.connector import PullJob, TransferEvent

if TYPE_CHECKING:
    from meshserve.disagg.connector import KVConnector

logger = logging.getLogger(__name__)


@dataclass
class LayerJob:
    """One item of the sender's FIFO: a layer's gathered blocks ("layer") or the end of a stream ("done")."""

    kind: str
    transfer_id: str
    dst: int  # the consumer's kv rank
    layer: int = 0
    start: int = 0  # first block index (in the request's block table) of data
    data: torch.Tensor | None = None  # two-sided: the gathered blocks; None over a one-sided transport
    ready: torch.cuda.Event | None = None  # recorded on the compute stream after the gather (GPU)
    block_ids: tuple[int, ...] = ()  # the producer's ids of those blocks (one-sided: the consumer reads them)
    ok: bool = True
    first_token: int = -1
    num_blocks: int = 0
    reason: str = ""
    prefill_end: float = 0.0  # "done": when the producer's prefill ended (time.monotonic())


class LayerSender:
    """The producer's sender thread (see the module docstring)."""

    def __init__(self, conn: KVConnector):
        self.conn = conn
        self.jobs: queue.Queue[LayerJob | None] = queue.Queue()
        self._sockets: dict[int, zmq.Socket] = {}
        self._spans: dict[str, list[float]] = {}  # transfer id -> [first send start, last send end, bytes]
        self._failed: dict[str, str] = {}  # transfer id -> why its sends stopped
        # one-sided: transfer id -> (first LayerSent sent, prefill ended, bytes announced), until the
        # consumer's Ack says when it read them (read_done)
        self.announced: dict[str, tuple[float, float, int]] = {}
        # fault injection for tests: a job this returns True for is dropped (as if lost)
        self.skip: Callable[[LayerJob], bool] | None = None

    def put(self, job: LayerJob) -> None:
        self.jobs.put(job)

    def run(self) -> None:
        self.conn._thread_init()
        stream = getattr(self.conn, "_send_stream", None)
        if stream is not None:  # NCCL orders a send after the caller's current stream: not the compute stream
            torch.cuda.set_stream(stream)
        while True:
            job = self.jobs.get()
            if job is None:
                break
            if self.skip is not None and self.skip(job):
                continue
            try:
                self._send(job)
            except Exception as e:  # noqa: BLE001  (the consumer is gone: this transfer stops, others go on)
                logger.warning(
                    "KV transfer %s: layer-wise send to rank %d failed: %s", job.transfer_id, job.dst, e
                )
                self._failed[job.transfer_id] = str(e)
                self._spans.pop(job.transfer_id, None)
                self.announced.pop(job.transfer_id, None)
                self.conn.events.put(TransferEvent("released", job.transfer_id, reason=str(e)))
        for s in self._sockets.values():
            s.close(linger=0)

    def _socket(self, dst: int) -> zmq.Socket:
        sock = self._sockets.get(dst)
        if sock is None:
            sock = self._sockets[dst] = self.conn._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.conn._peer_address(dst, "stream"))
        return sock

    def _send(self, job: LayerJob) -> None:
        if job.transfer_id in self._failed:
            if job.kind == "done":
                del self._failed[job.transfer_id]
            return
        sock = self._socket(job.dst)
        if job.kind == "done":
            # the stream's report first: the consumer's Ack, and so the "released" event, may come as soon as
            # StreamDone is out (one-sided, read_done on the server thread needs `announced` by then)
            span = self._spans.pop(job.transfer_id, None)
            if self.conn.one_sided_read:  # the reads are the consumer's: see read_done (none if it failed)
                if span is not None and job.ok:
                    self.announced[job.transfer_id] = (span[0], job.prefill_end, int(span[2]))
            elif span is not None:  # seconds: how much of the sending overlapped the prefill
                overlap = max(0.0, min(span[1], job.prefill_end) - span[0])
                self.conn.events.put(
                    TransferEvent(
                        "streamed",
                        job.transfer_id,
                        num_bytes=int(span[2]),
                        seconds=overlap,
                        started=span[0],
                        ended=span[1],
                    )
                )
            msg = sc.StreamDone(
                job.transfer_id, job.ok, job.first_token, job.num_blocks, job.reason, self.conn.rank
            )
            sock.send(sc.encoder.encode(msg))
            return
        if job.ready is not None:
            job.ready.synchronize()  # the compute stream has written and gathered this layer
        t0 = time.monotonic()
        if job.data is None:  # one-sided: the header names the blocks; the consumer reads them
            count = len(job.block_ids)
            header = sc.LayerSent(
                job.transfer_id, job.layer, job.start, count, self.conn.rank, list(job.block_ids)
            )
            sock.send(sc.encoder.encode(header))
            kv = self.conn.kv_tensors[job.layer]
            nbytes = count * kv[:, 0].numel() * kv.element_size()
        else:
            count = job.data.shape[1]
            sock.send(
                sc.encoder.encode(sc.LayerSent(job.transfer_id, job.layer, job.start, count, self.conn.rank))
            )
            nbytes = self.conn._send_layer(job.dst, job.data)
        span = self._spans.setdefault(job.transfer_id, [t0, 0.0, 0])
        span[1] = time.monotonic()
        span[2] += nbytes

    def read_done(self, transfer_id: str, read_span: list[float]) -> TransferEvent | None:
        """One-sided: the "streamed" report of a transfer whose consumer read every layer, read_span being
        when its reads began and ended after it took the first LayerSent (the one-way latency of that header,
        well under a millisecond on a LAN, is neglected). None when nothing was announced here."""
        announced = self.announced.pop(transfer_id, None)
        if announced is None or len(read_span) != 2:
            return None
        first_sent, prefill_end, nbytes = announced
        started, ended = first_sent + read_span[0], first_sent + read_span[1]
        overlap = max(0.0, min(ended, prefill_end) - started)
        return TransferEvent(
            "streamed", transfer_id, num_bytes=nbytes, seconds=overlap, started=started, ended=ended
        )


@dataclass
class _Receiving:
    job: PullJob
    deadline: float
    asked: set[int]
    started: float
    got: list[bytearray] = field(default_factory=list)  # per layer: 1 where a block arrived
    nbytes: int = 0
    reasons: list[str] = field(default_factory=list)  # producers that refused it, and why
    # one-sided: when the first LayerSent was taken, and the span of the reads (time.monotonic())
    first_header: float = 0.0
    read_span: list[float] = field(default_factory=list)


class LayerReceiver:
    """The consumer's receiver thread (see the module docstring)."""

    def __init__(self, conn: KVConnector):
        self.conn = conn
        self._active: dict[str, _Receiving] = {}
        self._dealers: dict[int, zmq.Socket] = {}

    def run(self) -> None:
        conn = self.conn
        conn._thread_init()
        stream = conn._stream_socket
        while not conn._stop.is_set():
            self._take_jobs()
            if stream.poll(20):
                msg = sc.decoder.decode(stream.recv())
                if isinstance(msg, sc.LayerSent):
                    self._on_layer(msg)
                elif isinstance(msg, sc.StreamDone):
                    self._on_done(msg)
            now = time.monotonic()
            for tid, r in list(self._active.items()):
                if now > r.deadline:
                    complete = sum(all(g) for g in r.got)
                    self._finish(
                        tid,
                        False,
                        f"timed out after {conn.config.transfer_timeout_s:.1f} s with "
                        f"{complete} of {len(r.got)} layers complete",
                    )
        for s in self._dealers.values():
            s.close(linger=0)

    def _dealer(self, rank: int) -> zmq.Socket:
        sock = self._dealers.get(rank)
        if sock is None:
            sock = self._dealers[rank] = self.conn._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.conn._peer_address(rank))
        return sock

    def _take_jobs(self) -> None:
        conn = self.conn
        while True:
            try:
                job = conn._jobs.get_nowait()
            except queue.Empty:
                return
            if job is None:
                return
            ranks = [job.remote_rank] if job.remote_rank is not None else conn._producer_ranks()
            ranks = [r for r in ranks if r != conn.rank]
            now = time.monotonic()
            r = _Receiving(job, now + conn.config.transfer_timeout_s, set(ranks), now)
            r.got = [bytearray(len(job.block_ids)) for _ in conn.kv_tensors]
            self._active[job.transfer_id] = r
            if not ranks:
                self._finish(job.transfer_id, False, "no producer in the transfer group")
                continue
            pull = sc.encoder.encode(sc.Pull(job.transfer_id, conn.rank, job.num_tokens, layerwise=True))
            for rank in ranks:
                self._dealer(rank).send(pull)

    def _on_layer(self, msg: sc.LayerSent) -> None:
        r = self._active.get(msg.transfer_id)
        ids = None
        if (
            r is not None
            and 0 <= msg.layer < len(r.got)
            and 0 <= msg.start
            and msg.start + msg.count <= len(r.got[0])
        ):
            seen = r.got[msg.layer][msg.start : msg.start + msg.count]
            if not any(seen):
                ids = r.job.block_ids[msg.start : msg.start + msg.count]
        layer = min(max(msg.layer, 0), len(self.conn.kv_tensors) - 1)
        now = time.monotonic()
        timeout = max(0.1, (r.deadline if r is not None else now + 5) - now)
        one_sided = self.conn.one_sided_read
        if one_sided and ids is not None and len(msg.block_ids) != msg.count:
            ids = None  # (a bad header: nothing is read, the transfer fails below)
        if r is not None and not r.first_header:
            r.first_header = now
        try:
            if not one_sided:
                nbytes = self.conn._recv_layer(msg.src, self.conn.kv_tensors[layer], ids, msg.count, timeout)
            elif ids is not None:  # (nothing to read for a transfer given up: no link order to keep)
                nbytes = self.conn._read_layer(msg.src, layer, msg.block_ids, ids, timeout)
                if not r.read_span:
                    r.read_span = [now, 0.0]
                r.read_span[1] = time.monotonic()
        except Exception as e:  # noqa: BLE001  (the link is broken: every transfer from that producer fails)
            unsafe = getattr(e, "blocks_unsafe", False)  # a read still running may write this one's blocks
            for tid, other in list(self._active.items()):
                if msg.src in other.asked:
                    retire = unsafe and tid == msg.transfer_id
                    self._finish(tid, False, f"receiving from rank {msg.src} failed: {e}", retire=retire)
            return
        if r is None:
            return
        if ids is None:
            self._finish(msg.transfer_id, False, f"bad layer header from rank {msg.src}: {msg}")
            return
        r.got[msg.layer][msg.start : msg.start + msg.count] = b"\x01" * msg.count
        r.nbytes += nbytes

    def _on_done(self, msg: sc.StreamDone) -> None:
        r = self._active.get(msg.transfer_id)
        if r is None:
            return
        if not msg.ok:
            r.asked.discard(msg.src)
            r.reasons.append(f"rank {msg.src}: {msg.reason}")
            if not r.asked:
                self._finish(msg.transfer_id, False, "no producer holds it: " + "; ".join(r.reasons))
            return
        n = len(r.job.block_ids)
        missing = [i for i, g in enumerate(r.got) if sum(g) != n]
        if msg.num_blocks != n:
            self._finish(
                msg.transfer_id, False, f"rank {msg.src} sent {msg.num_blocks} blocks, {n} expected", msg.src
            )
        elif missing:
            self._finish(
                msg.transfer_id, False, f"layer(s) {missing} incomplete at the end of the stream", msg.src
            )
        else:
            self._finish(msg.transfer_id, True, "", msg.src, msg.first_token)

    def _finish(
        self,
        tid: str,
        ok: bool,
        reason: str,
        src: int | None = None,
        first_token: int = -1,
        retire: bool = False,
    ) -> None:
        r = self._active.pop(tid)
        read_span = [t - r.first_header for t in r.read_span] if ok else []
        for rank in [src] if src is not None else sorted(r.asked):
            self._dealer(rank).send(sc.encoder.encode(sc.Ack(tid, ok, read_span)))
        if not ok:
            logger.warning("KV transfer %s failed: %s", tid, reason)
        kind = "received" if ok else "failed"
        event = TransferEvent(kind, tid, r.job.request_id, first_token, r.nbytes, reason=reason)
        event.retire_blocks = retire
        event.seconds = time.monotonic() - r.started
        self.conn.events.put(event)
