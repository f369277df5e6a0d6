"""A pipeline stage's activations: where a step's input arrives and how its output leaves, without host waits.

A stage step on a GPU is: receive the previous stage's hidden states and residual, replay a captured graph,
send the result on. Three rules keep the host out of the device's way:
  - receive straight into the static input buffers of the graph that will serve the step (no fresh buffer,
    no copy; the graph's run() sees its own buffers and skips the copy). On NCCL the receive is queued
    behind the stage's earlier work (a replay still reading those buffers finishes first) and the compute
    stream waits for it: the host never does.
  - send without waiting: NCCL queues the send behind the compute and the handle is kept until done. Only
    a graph's output is copied first, since the next replay overwrites it while the send may still read it;
    an eager forward's output is its own.
  - the engine keeps `pipeline_depth` steps in flight, each over other sequences (EngineCore._step_pipelined,
    Scheduler.pipeline_depth): one per stage keeps every stage on some step; one more hides the host's
    round trip for the oldest step's tokens (last stage -> rank 0 -> schedule -> first stage) behind it.
On gloo (CPU) the same path runs; a receive waits there, and a send completes once the next stage has it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meshserve.config import ParallelConfig
from meshserve.distributed.pipeline import recv_activations_into, send_activations
from meshserve.layers.pipeline import IntermediateTensors


def pipeline_depth(pc: ParallelConfig) -> int:
    """Steps the engine keeps in flight: 0 without pipeline stages, else pc.pipeline_depth or one per stage."""
    if pc.pipeline_parallel_size == 1:
        return 0
    return pc.pipeline_depth or pc.pipeline_parallel_size


@dataclass
class StageCounts:
    """Steps of this stage by how they ran: replaying a captured graph (its input received in place) or eagerly."""

    graph_steps: int = 0
    eager_steps: int = 0
    sends_copied: int = 0


class StageIO:
    """One rank's activation traffic with its neighbour stages (receive on all but the first, send on all but
    the last). `graphs` below is the runner's DecodeGraphs or MixedStepGraphs chosen for the step (each holds
    `stage_in`, static IntermediateTensors sized for its largest batch), or None for the plain forward."""

    def __init__(self, hidden_size: int, dtype: torch.dtype, device: torch.device, is_first: bool, is_last: bool):
        self.hidden_size, self.dtype, self.device = hidden_size, dtype, device
        self.is_first, self.is_last = is_first, is_last
        self._sends: list = []  # NCCL send handles still in flight
        self.counts = StageCounts()

    def receive(self, num_tokens: int, graphs=None) -> IntermediateTensors | None:
        """The previous stage's activations for a step of num_tokens rows (None on the first stage): in the
        static buffers of `graphs` when one serves the step, else in fresh ones."""
        if graphs is not None:
            self.counts.graph_steps += 1
        else:
            self.counts.eager_steps += 1
        if self.is_first:
            return None
        static = getattr(graphs, "stage_in", None)
        if static is not None:
            buffers = [static.hidden[:num_tokens], static.residual[:num_tokens]]
        else:
            shape = (num_tokens, self.hidden_size)
            buffers = [torch.empty(shape, dtype=self.dtype, device=self.device) for _ in range(2)]
        hidden, residual = recv_activations_into(buffers)
        return IntermediateTensors(hidden, residual)

    def send(self, out: IntermediateTensors, from_graph: bool) -> None:
        """Send this stage's output on without waiting for it (from a copy when a graph's buffers hold it)."""
        tensors = [out.hidden, out.residual]
        if from_graph:
            tensors = [t.clone() for t in tensors]
            self.counts.sends_copied += 1
        works = send_activations(tensors)
        if self.device.type == "cuda":
            # NCCL queues the sends on its stream and keeps the tensors alive; the handles are kept until done
            # all the same (a dropped gloo send is cancelled)
            self._sends = [w for w in self._sends if not w.is_completed()] + works
        else:
            for work in works:  # gloo: the send completes once the next stage receives
                work.wait()

    @property
    def sends_in_flight(self) -> int:
        return len(self._sends)
