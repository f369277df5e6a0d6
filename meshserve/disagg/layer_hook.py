"""The producer's per-layer hook in the forward: a step's newly completed blocks, queued layer by layer.

Before a step, `begin` finds the producing requests whose blocks the step completes: full blocks of a prefill
chunk, and at the prompt's last chunk every block, the partial last one too (a block a chunk leaves partly
filled is sent once later chunks fill it, or at the end). Each attention layer calls `layer_done` right after
it wrote its cache: that layer's completed blocks are gathered on the compute stream (so no later step can
overwrite them first), an event is recorded, and the sender thread (layerwise.py) sends them once the event
is reached, while the next layers compute. Over a one-sided transport (one_sided) nothing is gathered: the
job names the blocks, which the consumer reads where they lie once the sender announces them (after the
event). Layers whose hook did not run (a replayed CUDA graph, an attention class without the hook) are queued
by `end`, after the forward. Requests nobody subscribed to yet only
advance their ready count; the coordinator sends what is ready when the subscription comes. A preemption
(the scheduler's kv_preempted, `preempted`) takes back what was ready: those blocks may be reused at once.
Runs on the core's thread (disaggregation is one device per instance: the runner is in this process).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from meshserve.disagg.kv_blocks import gather_layer
from meshserve.disagg.layerwise import LayerJob, LayerSender


@dataclass
class ProducerStream:
    """A producing request's layer-wise state: blocks [0, ready_blocks) of every layer are written;
    [0, queued_blocks) were queued for its consumer (once one subscribed)."""

    transfer_id: str
    request_id: str
    num_tokens: int  # prompt tokens
    num_blocks: int  # blocks the prompt fills
    consumer: int | None = None
    ready_blocks: int = 0
    queued_blocks: int = 0
    block_table: tuple[int, ...] = ()  # as of the last step that advanced it
    first_token: int = -1  # known once the prefill is done (held)
    prefill_end: float = 0.0  # time.monotonic() when it was held
    done_queued: bool = False


class LayerwiseHook:
    """See the module docstring. streams: request id -> ProducerStream (shared with the coordinator)."""

    def __init__(
        self,
        streams: dict[str, ProducerStream],
        sender: LayerSender,
        kv_tensors: list[torch.Tensor],
        block_size: int,
        one_sided: bool = False,
    ):
        self.one_sided = one_sided
        self.streams = streams
        self.sender = sender
        self.kv_tensors = kv_tensors
        self.block_size = block_size
        self._plan: list[tuple[ProducerStream, int, int, list[int]]] = []
        self._fired: list[bool] = []

    def bind(self, attention_layers) -> None:
        """Install layer_done as each attention layer's after_kv_write (layer i writes kv_tensors[i])."""
        for i, attn in enumerate(attention_layers):
            attn.after_kv_write = functools.partial(self.layer_done, i)

    @property
    def active(self) -> bool:
        """The current step completes blocks someone waits for (the runner then skips CUDA graphs)."""
        return any(st.consumer is not None for st, *_ in self._plan)

    def begin(self, scheduled) -> None:
        self._plan = []
        for s in scheduled:
            st = self.streams.get(s.seq_id)
            if st is None:
                continue
            end = s.num_computed_tokens + s.num_new_tokens
            ready = st.num_blocks if end >= st.num_tokens else end // self.block_size
            if ready > st.ready_blocks:
                self._plan.append((st, st.ready_blocks, ready, list(s.block_table[:ready])))
        self._fired = [False] * len(self.kv_tensors)

    def layer_done(self, layer: int) -> None:
        if not self._plan or self._fired[layer]:
            return
        self._fired[layer] = True
        kv = self.kv_tensors[layer]
        for st, start, end, table in self._plan:
            if st.consumer is None:
                continue
            ids = table[start:end]
            self.sender.put(_layer_job(st.transfer_id, st.consumer, layer, start, kv, ids, self.one_sided))

    def end(self) -> None:
        for layer, fired in enumerate(self._fired):
            if not fired:
                self.layer_done(layer)
        for st, _start, end, table in self._plan:
            st.ready_blocks, st.block_table = end, tuple(table)
            if st.consumer is not None:
                st.queued_blocks = end
        self._plan = []


def _layer_job(
    transfer_id: str, dst: int, layer: int, start: int, kv: torch.Tensor, ids: list[int], one_sided: bool
) -> LayerJob:
    """A layer's blocks ids for the sender: gathered (two-sided), or named (one-sided: read where they lie);
    with an event on the compute stream after this layer's writes (and the gather) on GPUs."""
    data = None if one_sided else gather_layer(kv, ids)
    ready = None
    if kv.device.type == "cuda":
        ready = torch.cuda.Event()
        ready.record()
    return LayerJob("layer", transfer_id, dst, layer, start, data, ready, block_ids=tuple(ids))


def preempted(st: ProducerStream, sender: LayerSender, one_sided: bool = False) -> None:
    """The request was preempted: its blocks were released, and another request may write them before it is
    recomputed (into those ids or others), so none of them stays ready: a subscription that comes meanwhile
    must not be sent them (queue_ready reads st.block_table). Two-sided, the blocks already queued were
    gathered (copied; on GPUs by the compute stream, before any later step's writes) and stand: the recompute
    sends from there on. One-sided, the consumer reads the announced ids where they lie, maybe after their
    reuse: its transfer fails (it admits nothing); with nothing announced yet, it all starts again."""
    if one_sided and st.consumer is not None and st.queued_blocks:
        reason = "the request was preempted on the producer after blocks of it were announced"
        sender.put(LayerJob("done", st.transfer_id, st.consumer, ok=False, reason=reason))
        st.consumer = None
        st.queued_blocks = 0
    st.ready_blocks = st.queued_blocks
    st.block_table = st.block_table[: st.queued_blocks]


def queue_ready(
    st: ProducerStream, sender: LayerSender, kv_tensors: list[torch.Tensor], one_sided: bool = False
) -> None:
    """Queue what is ready and not yet queued (a late subscription), then StreamDone if the prefill is done."""
    if st.consumer is None:
        return
    if st.ready_blocks > st.queued_blocks:
        ids = list(st.block_table[st.queued_blocks : st.ready_blocks])
        for layer, kv in enumerate(kv_tensors):
            sender.put(_layer_job(st.transfer_id, st.consumer, layer, st.queued_blocks, kv, ids, one_sided))
        st.queued_blocks = st.ready_blocks
    if st.first_token >= 0 and not st.done_queued:
        st.done_queued = True
        sender.put(
            LayerJob(
                "done",
                st.transfer_id,
                st.consumer,
                first_token=st.first_token,
                num_blocks=st.num_blocks,
                prefill_end=st.prefill_end,
            )
        )
