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
    SchedulerConfig.pipeline_depth): one per stage keeps every stage on some step; one more hides the host's
    round trip for the oldest step's tokens (last stage -> rank 0 -> schedule -> first stage) behind it.
On gloo (CPU) the same path runs; a receive waits there, and a send completes once the next stage has it.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
import torch.distributed as dist

from meshserve.config import ParallelConfig
from meshserve.distributed.pipeline import recv_activations_into, send_activations
from meshserve.layers.pipeline import IntermediateTensors


def handoff_lag(pc: ParallelConfig) -> int:
    """With the token hand-off (pc.pp_token_handoff, TP = 1): a sequence's next step comes this many steps
    after its last (one per stage), its input token taken on the first stage's device from the last stage's
    samples of that step (TokenHandoff). 0: off, a sequence waits until its token is back on the host."""
    if pc.pipeline_parallel_size == 1 or pc.tensor_parallel_size != 1 or not pc.pp_token_handoff:
        return 0
    return pc.pipeline_parallel_size


class TokenHandoff:
    """The last stage's sampled ids of every step, sent to the first stage on the device (a communicator of their
    own), so that a sequence's next step, launched lag steps later before its token is back on the host, reads
    its input token there (Scheduler.handoff_lag decides which sequences may be scheduled so).

    Both ends count the same steps (every non-empty step, in launch order): the last stage sends each step's
    sampled ids (when it sampled any), the first stage receives step n - lag's when it prepares step n, whether
    step n needs them or not, so the n-th send always meets the n-th receive. On NCCL neither host waits: the
    receive is ordered on the first stage's stream before step n's input copy. The ids sent are a copy (the
    sampler reuses its buffers while a send may still wait for its receive)."""

    def __init__(self, lag: int, device: torch.device, group, first_rank: int, last_rank: int):
        self.lag, self.device, self.group = lag, device, group
        self.first_rank, self.last_rank = first_rank, last_rank
        self._steps: collections.deque[dict[str, int]] = collections.deque()  # first stage: rows by sequence
        self._sends: list = []
        self.num_handed = 0  # steps whose ids this end sent (last stage) or received (first stage)

    def connect(self, is_first: bool) -> None:
        """One exchange now, while both ends build their runners: NCCL creates a pair's communicator at its first
        send or receive and blocks the host until both ends are there. Left to the first step, the last stage
        would block there while rank 0 waits in its next broadcast for that stage to take it."""
        probe = torch.zeros(1, dtype=torch.int64, device=self.device)
        if is_first:
            dist.recv(probe, src=self.last_rank, group=self.group)
        else:
            dist.send(probe, dst=self.first_rank, group=self.group)

    @staticmethod
    def _rows(scheduled) -> dict[str, int]:
        """The step's sampled ids' rows by sequence (StepSampler's order: sampling rows, in batch order)."""
        return {s.seq_id: i for i, s in enumerate(s for s in scheduled if s.do_sample)}

    def send(self, scheduled, sampled: torch.Tensor | None) -> None:
        """Last stage, after sampling a step: its ids to the first stage (nothing when it sampled none)."""
        n = sum(1 for s in scheduled if s.do_sample)
        if n == 0:
            return
        ids = sampled[:n].to(torch.int64, copy=True)
        self._sends = [w for w in self._sends if not w.is_completed()]
        self._sends.append(dist.isend(ids, dst=self.first_rank, group=self.group))
        self.num_handed += 1

    def receive(self, scheduled) -> tuple[torch.Tensor | None, dict[str, int]]:
        """First stage, before preparing a step: step n - lag's sampled ids and their rows by sequence (None, {}
        while fewer steps ran, or when that step sampled none)."""
        self._steps.append(self._rows(scheduled))
        if len(self._steps) <= self.lag:
            return None, {}
        rows = self._steps.popleft()
        if not rows:
            return None, {}
        ids = torch.empty(len(rows), dtype=torch.int64, device=self.device)
        dist.recv(ids, src=self.last_rank, group=self.group)
        self.num_handed += 1
        return ids, rows


    def drain(self) -> None:
        """First stage, at shutdown: receive the last steps' ids, which no later step asked for, so the last
        stage's sends complete (an NCCL send left waiting would hold that rank's teardown)."""
        while self._steps:
            rows = self._steps.popleft()
            if rows:
                ids = torch.empty(len(rows), dtype=torch.int64, device=self.device)
                dist.recv(ids, src=self.last_rank, group=self.group)


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
