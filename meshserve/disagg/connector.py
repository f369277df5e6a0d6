"""The KV connector interface: moves a request's KV blocks, by block id and layer by layer, between engines.

The handshake (side_channel.py) is the same for every transport; a connector supplies the transport:
`_send_blocks` / `_recv_blocks` move the blocks of every layer between this engine's pool and a peer's (a
two-sided transport), or `_read_blocks` copies the producer's blocks into the consumer's from the consumer
alone (a one-sided transport, `one_sided_read`: the producer only grants the pull; layer-wise, `_read_layer`
reads one layer as the producer announces it), and `_peer_address` / `_publish_address` find the peers' side
channels. Two threads do the talking, so the engine core's step loop never waits on the network: a server
thread answers pulls (producer) and a worker thread runs pulls one at a time (consumer). The core learns what
happened through `events` (TransferEvent), drained once per step (coordinator.py), and is the only one to
touch the block manager.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import zmq

from meshserve.disagg import side_channel as sc
from meshserve.disagg.config import KVTransferConfig
from meshserve.errors import KVTransferError

logger = logging.getLogger(__name__)


@dataclass
class HeldTransfer:
    """A finished prefill's blocks, kept for a consumer to pull (producer side)."""

    transfer_id: str
    block_ids: list[int]
    num_tokens: int  # prompt tokens whose K/V the blocks hold
    first_token: int
    deadline: float  # time.monotonic() past which nobody will pull it: freed
    busy: bool = False  # being sent right now: not freed until the send ends
    read_by: int = -1  # one-sided: the consumer rank granted the read (no second grant)


@dataclass
class PullJob:
    """A decode request's transfer to receive into blocks the consumer allocated (consumer side)."""

    request_id: str
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    remote_rank: int | None = None  # the producer, when the handle names it (else every producer is asked)
    # the producer's blocks, when the handle names them too (its prefill's answer does): a one-sided read then
    # starts at once, beside the grant's round trip, instead of after it (_pull_ids_ahead)
    remote_block_ids: list[int] | None = None


@dataclass
class TransferEvent:
    """What a connector thread tells the core: "released" (producer: free transfer_id's blocks), "received"
    (consumer: request_id's KV is in its blocks) or "failed" (consumer: it is not, and will not be); layer-wise
    (layerwise.py) also "subscribe" (producer: rank peer wants transfer_id's layers as they are done),
    "abandoned" (producer: the consumer gave up before the blocks were held) and "streamed" (producer: every
    layer was sent, from started to ended, time.monotonic())."""

    kind: str
    transfer_id: str
    request_id: str = ""
    first_token: int = -1
    num_bytes: int = 0
    seconds: float = 0.0
    reason: str = ""
    retire_blocks: bool = False  # "failed": the blocks may still be written (an uncancelled read): never reuse them
    peer: int = -1
    num_tokens: int = 0
    started: float = 0.0
    ended: float = 0.0


class KVConnector(ABC):
    """Moves KV blocks between the engines of one transfer group; see the module docstring.

    Thread-safety: hold/pull/expire are called by the core thread; the connector's threads only read the KV
    tensors of held blocks (producer) or write those of blocks allocated to a pull (consumer), which nobody
    else touches until the core hears back through `events`.
    """

    name = "base"
    one_sided_read = False  # the consumer reads the producer's blocks itself (_read_blocks)

    def __init__(self, config: KVTransferConfig, kv_tensors: list[torch.Tensor]):
        self.config = config
        self.kv_tensors = kv_tensors
        self.rank = config.kv_rank
        self.events: queue.Queue[TransferEvent] = queue.Queue()
        self._held: dict[str, HeldTransfer] = {}
        self._lock = threading.Lock()
        self._jobs: queue.Queue[PullJob | None] = queue.Queue()
        self._stop = threading.Event()
        self._ctx = zmq.Context()
        self._threads: list[threading.Thread] = []
        self.num_in_flight = 0  # pulls queued or running (consumer)

    @property
    @abstractmethod
    def transport(self) -> str:
        """The transport in words, for logs (e.g. "torch.distributed/nccl")."""

    # -- transport (subclasses) -----------------------------------------------------------------
    @abstractmethod
    def _connect(self) -> None:
        """Join the transfer group (blocks until every rank joined)."""

    @abstractmethod
    def _publish_address(self, address: str, kind: str = "side_channel") -> None:
        """Make this rank's side-channel (or layer-wise "stream") address known to the group."""

    @abstractmethod
    def _peer_address(self, rank: int, kind: str = "side_channel") -> str:
        """The side-channel (or "stream") address of rank."""

    @abstractmethod
    def _producer_ranks(self) -> list[int]:
        """Ranks that may hold transfers (producers and kv_both)."""

    def _send_blocks(self, dst: int, block_ids: list[int]) -> int:
        """Two-sided: send the blocks' K/V of every layer, in order, to rank dst; returns the bytes sent."""
        raise NotImplementedError(f"the {self.name} connector does not send (one-sided)")

    def _recv_blocks(self, src: int, block_ids: list[int], timeout_s: float) -> int:
        """Two-sided: receive rank src's blocks into block_ids of every layer; returns the bytes received."""
        raise NotImplementedError(f"the {self.name} connector does not receive (one-sided)")

    def _read_blocks(self, src: int, remote_ids: list[int], block_ids: list[int], timeout_s: float) -> int:
        """One-sided: copy rank src's blocks remote_ids into block_ids, every layer; returns the bytes read."""
        raise NotImplementedError(f"the {self.name} connector has no one-sided read")

    def _send_layer(self, dst: int, data: torch.Tensor) -> int:
        """Layer-wise: send one gathered tensor to rank dst and wait until it is sent; returns its bytes."""
        raise NotImplementedError(f"the {self.name} connector has no layer-wise transport")

    def _recv_layer(
        self, src: int, kv_layer: torch.Tensor, block_ids: list[int] | None, count: int, timeout_s: float
    ) -> int:
        """Layer-wise: receive count blocks of one layer from rank src into block_ids of kv_layer (None: into a
        scratch buffer, dropped); returns the bytes received."""
        raise NotImplementedError(f"the {self.name} connector has no layer-wise transport")

    def _read_layer(
        self, src: int, layer: int, remote_ids: list[int], block_ids: list[int], timeout_s: float
    ) -> int:
        """Layer-wise, one-sided: copy rank src's blocks remote_ids of one layer into block_ids of that layer;
        returns the bytes read."""
        raise NotImplementedError(f"the {self.name} connector has no one-sided read")

    def _thread_init(self) -> None:
        """Per-thread set-up of the transport (e.g. the current CUDA device), run first in each thread."""

    def _host(self) -> str:
        import socket

        from meshserve.disagg.config import is_loopback

        host = self.config.extra("side_channel_host", None)
        if host:
            return host
        if is_loopback(self.config.kv_ip):
            return self.config.kv_ip
        return socket.gethostbyname(socket.gethostname())

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect the transport, open the side channel and start the threads."""
        t0 = time.perf_counter()
        self._connect()
        self._server = self._ctx.socket(zmq.ROUTER)
        self._server.setsockopt(zmq.LINGER, 0)
        port = self._server.bind_to_random_port("tcp://*")
        self._publish_address(f"tcp://{self._host()}:{port}")
        layerwise = self.config.layerwise
        if self.config.is_consumer and layerwise:
            self._stream_socket = self._ctx.socket(zmq.PULL)
            self._stream_socket.setsockopt(zmq.LINGER, 0)
            stream_port = self._stream_socket.bind_to_random_port("tcp://*")
            self._publish_address(f"tcp://{self._host()}:{stream_port}", "stream")
        if self.config.is_producer:
            from meshserve.disagg.layerwise import LayerSender

            self.sender = LayerSender(self)  # serves layer-wise pulls whatever this side's own mode
            self._spawn(self._serve, "kv-transfer-server")
            self._spawn(self.sender.run, "kv-transfer-sender")
        if self.config.is_consumer:
            if layerwise:
                from meshserve.disagg.layerwise import LayerReceiver

                self._spawn(LayerReceiver(self).run, "kv-transfer-receiver")
            else:
                self._spawn(self._work, "kv-transfer-puller")
        logger.info(
            "KV transfer: %s connector over %s, rank %d of %d (%s), %s, side channel port %d, ready in %.1f s",
            self.name,
            self.transport,
            self.rank,
            self.config.kv_parallel_size,
            self.config.kv_role,
            "layer-wise (each layer sent as the prefill finishes it)" if layerwise else "whole-request",
            port,
            time.perf_counter() - t0,
        )

    def _spawn(self, target, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)
        if hasattr(self, "sender"):
            self.sender.put(None)
        for t in self._threads:
            t.join(5)
        self._server.close(linger=0)
        if hasattr(self, "_stream_socket"):
            self._stream_socket.close(linger=0)
        self._ctx.term()

    # -- producer --------------------------------------------------------------------------------
    def hold(self, held: HeldTransfer) -> None:
        with self._lock:
            self._held[held.transfer_id] = held

    def expire(self, now: float) -> list[HeldTransfer]:
        """Held transfers past their deadline and not being sent: forgotten here, for the core to free."""
        with self._lock:
            gone = [h for h in self._held.values() if h.deadline < now and not h.busy]
            for h in gone:
                del self._held[h.transfer_id]
                if hasattr(self, "sender"):  # (a one-sided stream whose consumer never acknowledged it)
                    self.sender.announced.pop(h.transfer_id, None)
        return gone

    def next_deadline(self) -> float:
        """The earliest deadline of the held transfers not being sent (inf if none)."""
        with self._lock:
            return min((h.deadline for h in self._held.values() if not h.busy), default=float("inf"))

    def _serve(self) -> None:
        self._thread_init()
        while not self._stop.is_set():
            if not self._server.poll(100):
                continue
            ident, payload = self._server.recv_multipart()
            try:
                msg = sc.decoder.decode(payload)
            except Exception:  # noqa: BLE001  (a stray client: ignore it, keep serving)
                logger.warning("KV transfer: undecodable side-channel message ignored")
                continue
            if isinstance(msg, sc.Pull) and msg.layerwise:  # the core decides what to stream (coordinator)
                self.events.put(
                    TransferEvent(
                        "subscribe", msg.transfer_id, peer=msg.consumer_rank, num_tokens=msg.num_tokens
                    )
                )
            elif isinstance(msg, sc.Pull):
                self._answer_pull(ident, msg)
            elif isinstance(msg, sc.Ack):
                with self._lock:
                    held = self._held.pop(msg.transfer_id, None)
                if held is not None:
                    streamed = self.sender.read_done(msg.transfer_id, msg.read_span if msg.ok else [])
                    if streamed is not None:  # (before "released": the stream's report needs it held)
                        self.events.put(streamed)
                    failed = not msg.ok and self.one_sided_read  # (counted as failed, not as sent)
                    reason = f"rank {held.read_by} could not read the blocks" if failed else ""
                    self.events.put(TransferEvent("released", msg.transfer_id, reason=reason))
                elif not msg.ok:
                    self.events.put(TransferEvent("abandoned", msg.transfer_id))

    def _answer_pull(self, ident: bytes, pull: sc.Pull) -> None:
        with self._lock:
            held = self._held.get(pull.transfer_id)
            granted = (
                held is not None and not held.busy and held.read_by < 0 and held.num_tokens == pull.num_tokens
            )
            if granted and self.one_sided_read:
                # the consumer reads on its own; the ack (or the deadline) frees them. The deadline leaves the
                # read its transfer_timeout_s first: a consumer that died mid-read frees them that way
                held.read_by = pull.consumer_rank
                held.deadline = time.monotonic() + self.config.transfer_timeout_s + self.config.hold_timeout_s
            elif granted:
                held.busy = True
        if not granted:
            reason = (
                "unknown transfer (never held here, freed, or already pulled)"
                if held is None
                else f"prompt length differs: {held.num_tokens} tokens here, {pull.num_tokens} there"
                if held.num_tokens != pull.num_tokens
                else f"transfer already being read by rank {held.read_by}"
                if held.read_by >= 0
                else "transfer already being sent"
            )
            self._server.send_multipart(
                [ident, sc.encoder.encode(sc.PullReply(pull.transfer_id, False, reason))]
            )
            return
        self._server.send_multipart(
            [
                ident,
                sc.encoder.encode(
                    sc.PullReply(
                        pull.transfer_id,
                        True,
                        first_token=held.first_token,
                        num_tokens=held.num_tokens,
                        num_blocks=len(held.block_ids),
                        block_ids=held.block_ids if self.one_sided_read else [],
                    )
                ),
            ]
        )
        if self.one_sided_read:
            return
        t0 = time.perf_counter()
        try:
            nbytes = self._send_blocks(pull.consumer_rank, held.block_ids)
            logger.debug(
                "KV transfer %s: %d blocks (%d bytes) to rank %d in %.3f s",
                pull.transfer_id,
                len(held.block_ids),
                nbytes,
                pull.consumer_rank,
                time.perf_counter() - t0,
            )
        except Exception as e:  # noqa: BLE001  (the consumer died: its blocks are freed, the server goes on)
            logger.warning("KV transfer %s to rank %d failed: %s", pull.transfer_id, pull.consumer_rank, e)
            with self._lock:
                self._held.pop(pull.transfer_id, None)
            self.events.put(TransferEvent("released", pull.transfer_id, reason=str(e)))
            return
        with self._lock:  # now only the acknowledgement (or the deadline) frees it
            held.busy = False
            held.deadline = time.monotonic() + self.config.hold_timeout_s

    # -- consumer --------------------------------------------------------------------------------
    def pull(self, job: PullJob) -> None:
        """Queue a pull; its outcome comes back as a "received" or "failed" event."""
        self.num_in_flight += 1
        self._jobs.put(job)

    def _work(self) -> None:
        self._thread_init()
        sockets: dict[int, zmq.Socket] = {}
        while True:
            job = self._jobs.get()
            if job is None:
                break
            t0 = time.perf_counter()
            ack = None
            try:
                event, ack = self._run_pull(job, sockets)
            except Exception as e:  # noqa: BLE001
                logger.warning("KV transfer %s failed: %s", job.transfer_id, e)
                event = TransferEvent("failed", job.transfer_id, job.request_id, reason=str(e),
                                      retire_blocks=getattr(e, "blocks_unsafe", False))
            event.seconds = time.perf_counter() - t0
            self.events.put(event)
            if ack is not None:  # (after the event: the blocks are whole here, freeing them there can wait)
                try:
                    self._send_ack(ack, job.transfer_id, True)
                except zmq.ZMQError as e:  # (the producer frees them at its deadline instead)
                    logger.warning("KV transfer %s: acknowledgement not sent: %s", job.transfer_id, e)
        for s in sockets.values():
            s.close(linger=0)

    def _socket(self, rank: int, sockets: dict[int, zmq.Socket]) -> zmq.Socket:
        sock = sockets.get(rank)
        if sock is None:
            sock = sockets[rank] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self._peer_address(rank))
        return sock

    def _ask(self, rank: int, pull: sc.Pull, sockets: dict[int, zmq.Socket], deadline: float) -> sc.PullReply:
        self._socket(rank, sockets).send(sc.encoder.encode(pull))
        return self._reply(rank, pull, sockets, deadline)

    def _reply(self, rank: int, pull: sc.Pull, sockets: dict[int, zmq.Socket], deadline: float) -> sc.PullReply:
        """The producer's answer to pull (sent on rank's socket), or a refusal once the deadline passes."""
        sock = sockets[rank]
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(1000 * min(left, 0.1))):
                if self._stop.is_set():
                    break
                continue
            reply = sc.decoder.decode(sock.recv())
            if isinstance(reply, sc.PullReply) and reply.transfer_id == pull.transfer_id:
                return reply  # (replies to earlier pulls that timed out are dropped)
        # an unanswered socket may answer later: start afresh next time
        sockets.pop(rank).close(linger=0)
        return sc.PullReply(pull.transfer_id, False, f"rank {rank} did not answer in time")

    def _pull_ids_ahead(
        self, job: PullJob, sockets: dict[int, zmq.Socket], deadline: float
    ) -> tuple[int, sc.PullReply, int]:
        """A one-sided pull whose handle names the producer's blocks: the grant is asked and the blocks read at once,
        the read kept only if the grant comes back for those blocks (a held transfer's blocks are never written
        while held, and a transfer once released is never held again: a grant after the read means the blocks
        were held all through it). (rank, its grant, bytes read); raises KVTransferError when refused (the consumer's
        blocks hold garbage then, and are freed with the failed pull)."""
        rank, remote_ids = job.remote_rank, job.remote_block_ids
        pull = sc.Pull(job.transfer_id, self.rank, job.num_tokens)
        self._socket(rank, sockets).send(sc.encoder.encode(pull))
        try:
            nbytes = self._read_blocks(rank, remote_ids, job.block_ids, max(0.1, deadline - time.monotonic()))
        except Exception:
            reply = self._reply(rank, pull, sockets, deadline)
            if reply.ok:  # (granted meanwhile: the producer frees them now rather than at expiry)
                self._send_ack(sockets[rank], job.transfer_id, False)
            raise
        reply = self._reply(rank, pull, sockets, deadline)
        if not reply.ok:
            raise KVTransferError(f"no producer holds transfer {job.transfer_id}: rank {rank}: {reply.reason}")
        if reply.num_blocks != len(job.block_ids):
            self._send_ack(sockets[rank], job.transfer_id, False)
            raise KVTransferError(f"rank {rank} sends {reply.num_blocks} blocks, {len(job.block_ids)} expected")
        if reply.block_ids != remote_ids:  # (the handle named other blocks: read the ones granted)
            logger.warning("KV transfer %s: the handle's block ids are not the producer's; read again",
                           job.transfer_id)
            try:
                nbytes = self._read_blocks(rank, reply.block_ids, job.block_ids, max(0.1, deadline - time.monotonic()))
            except Exception:
                self._send_ack(sockets[rank], job.transfer_id, False)
                raise
        return rank, reply, nbytes

    def _run_pull(self, job: PullJob, sockets: dict[int, zmq.Socket]) -> tuple[TransferEvent, zmq.Socket]:
        """The pull's "received" event and the socket its positive acknowledgement goes to (sent once the event
        is queued); a failure raises, negative acknowledgements sent."""
        timeout = self.config.transfer_timeout_s
        deadline = time.monotonic() + timeout
        if (self.one_sided_read and job.remote_block_ids is not None and job.remote_rank is not None
                and job.remote_rank != self.rank):
            rank, reply, nbytes = self._pull_ids_ahead(job, sockets, deadline)
            event = TransferEvent("received", job.transfer_id, job.request_id, reply.first_token, nbytes)
            return event, sockets[rank]
        pull = sc.Pull(job.transfer_id, self.rank, job.num_tokens)
        ranks = [job.remote_rank] if job.remote_rank is not None else self._producer_ranks()
        reasons = []
        for rank in ranks:
            if rank == self.rank:
                continue
            reply = self._ask(rank, pull, sockets, deadline)
            if not reply.ok:
                reasons.append(f"rank {rank}: {reply.reason}")
                continue
            if reply.num_blocks != len(job.block_ids):
                self._send_ack(sockets[rank], job.transfer_id, False)
                raise KVTransferError(
                    f"rank {rank} sends {reply.num_blocks} blocks, {len(job.block_ids)} expected"
                )
            left = max(0.1, deadline - time.monotonic())
            if not self.one_sided_read:
                nbytes = self._recv_blocks(rank, job.block_ids, left)
            else:
                try:
                    nbytes = self._read_blocks(rank, reply.block_ids, job.block_ids, left)
                except Exception:
                    if rank in sockets:  # the producer (if alive) frees its blocks now rather than at expiry
                        self._send_ack(sockets[rank], job.transfer_id, False)
                    raise
            event = TransferEvent("received", job.transfer_id, job.request_id, reply.first_token, nbytes)
            return event, sockets[rank]
        raise KVTransferError(f"no producer holds transfer {job.transfer_id}: " + "; ".join(reasons))

    def _send_ack(self, sock: zmq.Socket, transfer_id: str, ok: bool) -> None:
        sock.send(sc.encoder.encode(sc.Ack(transfer_id, ok)))
