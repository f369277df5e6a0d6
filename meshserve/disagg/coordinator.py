"""The engine core's side of disaggregation: which requests produce or consume KV, and their block accounting.

Producer: a request whose kv_transfer_params say do_remote_decode runs as usual (chunked prefill, prefix cache,
its first token); when it finishes, the scheduler hands its blocks here instead of freeing them (`hold`), and
they stay held until the consumer acknowledges them, the send fails, or hold_timeout_s passes.
Consumer: a request whose params say do_remote_prefill gets blocks for its whole prompt at once, kept out of
the prefix cache until filled, and a pull on the connector's thread; once the KV is in, it joins the scheduler
with its prompt computed and the producer's first token as its first output, and decodes. A pull that fails or
times out frees its blocks and ends the request with a KVTransferError (503: the router retries colocated).
Layer-wise (kv_connector_extra_config layerwise, layerwise.py): every producer request has a ProducerStream;
a consumer's subscription attaches to it (or waits transfer_timeout_s for the request to arrive), the runner's
per-layer hook queues each step's completed blocks, and the hold queues the end of the stream.
Everything here runs on the core's thread; the connector's threads report through its event queue.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from meshserve.disagg.config import KVTransferConfig
from meshserve.disagg.connector import HeldTransfer, KVConnector, PullJob, TransferEvent
from meshserve.disagg.layer_hook import ProducerStream, preempted, queue_ready
from meshserve.disagg.layerwise import LayerJob
from meshserve.disagg.stats import KVTransferStats
from meshserve.engine.messages import EngineCoreOutput, RequestError, error_to_message
from meshserve.engine.sequence import Sequence, SequenceStatus
from meshserve.errors import InvalidArgumentError, KVTransferError

if TYPE_CHECKING:
    from meshserve.engine.scheduler import Scheduler

logger = logging.getLogger(__name__)

PARAM_KEYS = ("do_remote_decode", "do_remote_prefill", "transfer_id", "remote_rank", "remote_block_ids")


@dataclass
class TransferParams:
    """A request's kv_transfer_params, checked."""

    do_remote_decode: bool = False  # producer: hold the KV for a consumer
    do_remote_prefill: bool = False  # consumer: pull the KV instead of computing the prompt
    transfer_id: str = ""
    remote_rank: int | None = None
    remote_block_ids: list[int] | None = None  # the producer's held blocks (its prefill's answer names them)


def parse_transfer_params(value: Any, request_id: str) -> TransferParams | None:
    """TransferParams from a request's kv_transfer_params (None: an ordinary request)."""
    if value is None:
        return None

    def bad(msg: str) -> InvalidArgumentError:
        return InvalidArgumentError(f"kv_transfer_params: {msg}", param="kv_transfer_params")

    if not isinstance(value, dict):
        raise bad(f"must be an object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(PARAM_KEYS))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)} (known: {', '.join(PARAM_KEYS)})")
    p = TransferParams(
        bool(value.get("do_remote_decode")),
        bool(value.get("do_remote_prefill")),
        value.get("transfer_id") or request_id,
        value.get("remote_rank"),
        value.get("remote_block_ids"),
    )
    if p.do_remote_decode and p.do_remote_prefill:
        raise bad("do_remote_decode and do_remote_prefill exclude each other")
    if not isinstance(p.transfer_id, str):
        raise bad(f"transfer_id must be a string, got {p.transfer_id!r}")
    if p.remote_rank is not None and (not isinstance(p.remote_rank, int) or p.remote_rank < 0):
        raise bad(f"remote_rank must be a kv rank (an integer >= 0), got {p.remote_rank!r}")
    ids = p.remote_block_ids
    if ids is not None:
        if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
            raise bad("remote_block_ids must be a list of block ids (integers >= 0)")
        if p.remote_rank is None:
            raise bad("remote_block_ids needs remote_rank (the kv rank holding those blocks)")
    return p if (p.do_remote_decode or p.do_remote_prefill) else None


class KVTransferCoordinator:
    """See the module docstring. Built by EngineCore when a kv_transfer_config is given."""

    def __init__(self, config: KVTransferConfig, connector: KVConnector, scheduler: Scheduler):
        self.config = config
        self.connector = connector
        self.scheduler = scheduler
        self.block_manager = scheduler.block_manager
        self.stats = KVTransferStats()
        self._producing: dict[str, str] = {}  # request id -> transfer id (producer requests not finished)
        self._held: dict[str, list] = {}  # transfer id -> the held Blocks (producer)
        self._receiving: dict[str, Sequence] = {}  # request id -> sequence whose KV is on its way (consumer)
        # their transfer ids: one pull per transfer at a time (the layer-wise receiver keys its state, and the
        # stream's messages, by transfer id: a second pull would take over the first's, whose blocks then
        # never come back, and be sent the first's layers)
        self._pulling: set[str] = set()
        self._cancelled: set[str] = set()  # aborted while receiving: freed when the pull ends
        self._errors: list[RequestError] = []
        self._handles: dict[str, dict] = {}  # request id -> its held transfer's handle, until its output takes it
        self.num_events = (
            0  # connector reports applied since start (the core republishes its counters on news)
        )
        # layer-wise: producer requests by request id (until held) and by transfer id (until released)
        self.streams: dict[str, ProducerStream] = {}
        self._streams_by_tid: dict[str, ProducerStream] = {}
        self._subscriptions: dict[
            str, tuple[int, int, float]
        ] = {}  # before the request came: (rank, tokens, deadline)
        scheduler.kv_hold = self.hold
        scheduler.kv_preempted = self._preempted

    # -- requests --------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> bool:
        """Take a new request that carries kv_transfer_params; True when it is the coordinator's now (a
        consumer's pull), False when the scheduler runs it as usual (a producer's prefill, or no params)."""
        params = parse_transfer_params(seq.params.kv_transfer_params, seq.request_id)
        if params is None:
            return False
        if params.do_remote_decode:
            if not self.config.is_producer:
                raise InvalidArgumentError(
                    f"kv_transfer_params: do_remote_decode needs a producer; this server's "
                    f"kv_role is {self.config.kv_role}",
                    param="kv_transfer_params",
                )
            if params.transfer_id in self._held or params.transfer_id in self._producing.values():
                raise InvalidArgumentError(
                    f"kv_transfer_params: transfer_id {params.transfer_id} is already in use",
                    param="kv_transfer_params",
                )
            self._producing[seq.request_id] = params.transfer_id
            st = ProducerStream(
                params.transfer_id,
                seq.request_id,
                seq.num_prompt_tokens,
                self.block_manager.blocks_needed(seq.num_prompt_tokens),
            )
            self.streams[seq.request_id] = self._streams_by_tid[params.transfer_id] = st
            sub = self._subscriptions.pop(params.transfer_id, None)
            if sub is not None:
                self._attach(st, sub[0], sub[1])
            return False
        if not self.config.is_consumer:
            raise InvalidArgumentError(
                f"kv_transfer_params: do_remote_prefill needs a consumer; this server's "
                f"kv_role is {self.config.kv_role}",
                param="kv_transfer_params",
            )
        if params.transfer_id in self._pulling:
            raise InvalidArgumentError(
                f"kv_transfer_params: transfer_id {params.transfer_id} is already being received",
                param="kv_transfer_params",
            )
        self.scheduler.check_fits(seq.num_prompt_tokens, seq.max_tokens)
        num_blocks = self.block_manager.blocks_needed(seq.num_prompt_tokens)
        if not self.block_manager.allocate_unregistered(seq, num_blocks):
            # no room now: a clean refusal the router retries elsewhere (never a wait without a bound)
            raise KVTransferError(f"no free KV blocks for a {seq.num_prompt_tokens}-token transfer now")
        self._receiving[seq.request_id] = seq
        self._pulling.add(params.transfer_id)
        self.stats.receiving_blocks += num_blocks
        self.connector.pull(
            PullJob(
                seq.request_id,
                params.transfer_id,
                list(self.block_manager.block_table(seq)),
                seq.num_prompt_tokens,
                params.remote_rank,
                params.remote_block_ids,
            )
        )
        return True

    def abort(self, seq: Sequence) -> bool:
        """True when seq's KV is still on its way: its blocks are freed once the pull ends, not now."""
        if self._producing.pop(seq.request_id, None) is not None:
            self._end_stream(seq.request_id, "the request was aborted on the producer")
        if seq.request_id in self._receiving:
            self._cancelled.add(seq.request_id)
            return True
        return False

    def hold(self, seq: Sequence, status: SequenceStatus) -> bool:
        """The scheduler's finish hook: keep a finished producer request's blocks for its consumer."""
        transfer_id = self._producing.pop(seq.request_id, None)
        if transfer_id is None or status == SequenceStatus.FINISHED_ABORTED or not seq.output_token_ids:
            self._end_stream(seq.request_id, "the request ended on the producer without a first token")
            return False
        blocks = self.block_manager.detach(seq)
        n = self.block_manager.blocks_needed(seq.num_prompt_tokens)
        if len(blocks) > n:  # blocks past the prompt (lookahead slots) are not sent
            self.block_manager.release_blocks(blocks[n:])
            blocks = blocks[:n]
        self._held[transfer_id] = blocks
        self.stats.held_blocks += len(blocks)
        self._handles[seq.request_id] = {  # (a held request ends in a step's update, whose output takes it)
            "transfer_id": transfer_id,
            "remote_rank": self.config.kv_rank,
            "remote_block_ids": [b.block_id for b in blocks],
        }
        self.connector.hold(
            HeldTransfer(
                transfer_id,
                [b.block_id for b in blocks],
                seq.num_prompt_tokens,
                seq.output_token_ids[0],
                time.monotonic() + self.config.hold_timeout_s,
            )
        )
        st = self.streams.pop(seq.request_id, None)
        if st is not None:  # layer-wise: the rest of the layers (if any) and the end of the stream
            st.ready_blocks, st.block_table = len(blocks), tuple(b.block_id for b in blocks)
            st.first_token, st.prefill_end = seq.output_token_ids[0], time.monotonic()
            if st.consumer is not None:
                self._set_busy(transfer_id, True, st.consumer)
                self._queue_ready(st)
        return True

    def take_handle(self, request_id: str) -> dict | None:
        """A finished producer request's handle for its decode leg (the prefill's answer carries it: a consumer
        given the block ids reads them beside the grant's round trip), once; None for any other request."""
        return self._handles.pop(request_id, None)

    # -- layer-wise (producer) ---------------------------------------------------------------------
    def _preempted(self, seq: Sequence) -> None:
        """The scheduler's preemption hook: seq's blocks are released, so its stream has nothing ready."""
        st = self.streams.get(seq.request_id)
        if st is not None:
            preempted(st, self.connector.sender, self.connector.one_sided_read)

    def _end_stream(self, request_id: str, reason: str) -> None:
        """A producer request that will not be held: its consumer (if any) hears so."""
        st = self.streams.pop(request_id, None)
        if st is None:
            return
        self._streams_by_tid.pop(st.transfer_id, None)
        if st.consumer is not None:
            self.connector.sender.put(LayerJob("done", st.transfer_id, st.consumer, ok=False, reason=reason))

    def _attach(self, st: ProducerStream, rank: int, num_tokens: int) -> None:
        refusal = (
            f"prompt length differs: {st.num_tokens} tokens here, {num_tokens} there"
            if num_tokens != st.num_tokens
            else "transfer already being sent"
            if st.consumer is not None
            else ""
        )
        if refusal:
            self.connector.sender.put(LayerJob("done", st.transfer_id, rank, ok=False, reason=refusal))
            return
        st.consumer = rank
        if st.first_token >= 0:
            self._set_busy(st.transfer_id, True, rank)
        self._queue_ready(st)

    def _queue_ready(self, st: ProducerStream) -> None:
        queue_ready(st, self.connector.sender, self.connector.kv_tensors, self.connector.one_sided_read)

    def _subscribe(self, event: TransferEvent) -> None:
        st = self._streams_by_tid.get(event.transfer_id)
        if st is not None:
            self._attach(st, event.peer, event.num_tokens)
        else:  # the prefill request may not have come yet (the router sends both legs at once)
            deadline = time.monotonic() + self.config.transfer_timeout_s
            self._subscriptions[event.transfer_id] = (event.peer, event.num_tokens, deadline)

    def _set_busy(self, transfer_id: str, busy: bool, consumer: int = -1) -> None:
        """A held transfer being streamed is not expired; once sent, the hold deadline starts again.
        One-sided (NIXL): nothing is sent from here; the consumer reads, within its transfer_timeout_s, so
        the hold lasts that much longer instead (as a granted whole-request read), for that consumer alone."""
        with self.connector._lock:
            held = self.connector._held.get(transfer_id)
            if held is None:
                return
            held.deadline = time.monotonic() + self.config.hold_timeout_s
            if self.connector.one_sided_read:
                if busy:
                    held.read_by = consumer
                    held.deadline += self.config.transfer_timeout_s
            else:
                held.busy = busy

    # -- each step -------------------------------------------------------------------------------
    @property
    def num_receiving(self) -> int:
        """Requests waiting for their prompt's KV (aborted ones whose pull still runs not counted)."""
        return sum(1 for rid in self._receiving if rid not in self._cancelled)

    @property
    def busy(self) -> bool:
        """Something for the core to do soon: pulls in flight, events waiting, or held blocks past due."""
        return (
            bool(self._receiving)
            or not self.connector.events.empty()
            or (bool(self._held) and self.connector.next_deadline() < time.monotonic())
        )

    def poll(self, wait_s: float = 0.0) -> list[EngineCoreOutput]:
        """Apply what the connector reported (waiting up to wait_s for the first report) and free expired
        holds; returns the first-token outputs of consumer requests that may now decode."""
        outputs = []
        try:
            event = (
                self.connector.events.get(timeout=wait_s)
                if wait_s > 0
                else self.connector.events.get_nowait()
            )
            while True:
                self.num_events += 1
                out = self._apply(event)
                if out is not None:
                    outputs.append(out)
                event = self.connector.events.get_nowait()
        except queue.Empty:
            pass
        now = time.monotonic()
        for tid, (rank, _n, deadline) in list(self._subscriptions.items()):
            if deadline < now:
                del self._subscriptions[tid]
                reason = "unknown transfer (never held here, freed, or already pulled)"
                self.connector.sender.put(LayerJob("done", tid, rank, ok=False, reason=reason))
        for held in self.connector.expire(time.monotonic()):
            logger.warning(
                "KV transfer %s: not pulled or acknowledged within %.0f s; freeing its blocks",
                held.transfer_id,
                self.config.hold_timeout_s,
            )
            self.stats.expired += 1
            self.num_events += 1
            self._release(held.transfer_id)
        return outputs

    def take_errors(self) -> list[RequestError]:
        errors, self._errors = self._errors, []
        return errors

    def _release(self, transfer_id: str) -> None:
        self._streams_by_tid.pop(transfer_id, None)
        blocks = self._held.pop(transfer_id, None)
        if blocks is not None:
            self.block_manager.release_blocks(blocks)
            self.stats.held_blocks -= len(blocks)

    def _apply(self, event: TransferEvent) -> EngineCoreOutput | None:
        if event.kind == "subscribe":
            self._subscribe(event)
            return None
        if event.kind == "streamed":
            self._set_busy(event.transfer_id, False)
            self.stats.observe_streamed(event.ended - event.started, event.seconds)
            logger.debug(
                "KV transfer %s: layers sent over %.3f s, %.3f s of it during the prefill",
                event.transfer_id,
                event.ended - event.started,
                event.seconds,
            )
            return None
        if event.kind == "abandoned":  # the consumer gave up while the prefill ran: hold for the deadline
            st = self._streams_by_tid.get(event.transfer_id)
            if st is not None:
                st.consumer = None
            return None
        if event.kind == "released":
            st = self._streams_by_tid.get(event.transfer_id)
            if event.reason and st is not None and event.transfer_id not in self._held:
                st.consumer = None  # the send failed mid-prefill: nothing more goes out, the hold expires
                self.stats.failed += 1
                return None
            if event.reason:  # the send failed (the consumer is gone)
                self.stats.failed += 1
            else:
                self.stats.sent += 1
                self.stats.sent_bytes += len(self._held.get(event.transfer_id, [])) * self._block_bytes()
            self._release(event.transfer_id)
            return None
        seq = self._receiving.pop(event.request_id, None)
        if seq is None:
            return None
        self._pulling.discard(event.transfer_id)
        self.stats.receiving_blocks -= len(self.block_manager.block_table(seq))
        if event.request_id in self._cancelled or event.kind == "failed":
            self._cancelled.discard(event.request_id)
            if event.retire_blocks:  # a read still running may write them: out of use for good
                logger.error("KV transfer %s: its %d receiving blocks are retired (a read could not be cancelled)",
                             event.transfer_id, len(self.block_manager.block_table(seq)))
                self.block_manager.retire(seq)
            else:
                self.block_manager.free(seq)
            if event.kind == "failed":
                self.stats.failed += 1
                if not seq.is_finished:
                    self._errors.append(
                        error_to_message(
                            seq.request_id,
                            KVTransferError(f"KV transfer {event.transfer_id} failed: {event.reason}"),
                        )
                    )
            return None
        self.stats.observe_received(event.num_bytes, event.seconds)
        return self._admit(seq, event.first_token)

    def _admit(self, seq: Sequence, first_token: int) -> EngineCoreOutput:
        """The prompt's KV is in: the sequence decodes from the producer's first token."""
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.num_cached_tokens = seq.num_prompt_tokens
        self.block_manager.record_transfer(seq)  # the whole prompt: external prefix-cache tokens, as vLLM's
        seq.first_scheduled_time = time.monotonic()
        seq.output_token_ids.append(first_token)
        out = EngineCoreOutput(
            seq.request_id,
            new_token_ids=[first_token],
            num_cached_tokens=seq.num_prompt_tokens,
            first_times=(seq.queued_time, seq.first_scheduled_time),
            num_external_cached_tokens=seq.num_prompt_tokens,
        )
        self.scheduler.seqs[seq.seq_id] = seq
        self.scheduler._check_token_stop(seq, first_token)  # EOS or max_tokens 1: done already
        if seq.is_finished:
            out.finish_reason = seq.status.finish_reason
            out.stop_reason = seq.stop_reason if isinstance(seq.stop_reason, int) else None
        else:
            self.scheduler.waiting.append(seq)
        return out

    def _block_bytes(self) -> int:
        from meshserve.disagg.kv_blocks import block_bytes

        return block_bytes(self.connector.kv_tensors)

    def snapshot(self) -> dict:
        return self.stats.as_dict()

    def close(self) -> None:
        self.connector.close()


def build_kv_transfer(config: KVTransferConfig | None, runner, scheduler) -> KVTransferCoordinator | None:
    """The connector the config names, started, and its coordinator (None without a config)."""
    if config is None:
        return None
    if runner is None:
        raise InvalidArgumentError(
            "kv_transfer_config: disaggregation runs on one device per instance for now "
            "(tensor and pipeline parallel 1)",
            param="kv_transfer_config",
        )
    tensors = runner.kv_pool.tensors
    if config.kv_connector == "nixl":
        from meshserve.disagg.nixl_connector import make_nixl_connector

        connector = make_nixl_connector(config, tensors)
    elif config.kv_connector == "ipc":
        from meshserve.disagg.ipc_connector import IpcConnector

        connector = IpcConnector(config, tensors)
    else:
        from meshserve.disagg.torch_connector import TorchConnector

        connector = TorchConnector(config, tensors)
    connector.start()
    coordinator = KVTransferCoordinator(config, connector, scheduler)
    if config.is_producer and config.layerwise:
        from meshserve.disagg.layer_hook import LayerwiseHook

        hook = LayerwiseHook(
            coordinator.streams, connector.sender, tensors, runner.block_size, connector.one_sided_read
        )
        hook.bind(runner.model.attention_layers())
        runner.layerwise_hook = hook
    return coordinator
