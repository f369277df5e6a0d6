"""What a model runner returns for one step: sampled ids, logprobs, pipeline timings, and the async handle."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch


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
    """One step's results, by sequence id. Only the sampler rank's output carries tokens.

    Plain data (picklable): a worker rank sends it to rank 0 as it is.
    """

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    # seq_id -> (chunk start position, logprobs of prompt tokens start+1, start+2, ... scored in this chunk)
    prompt_logprobs: dict[str, tuple[int, list[TokenLogprobs]]] = field(default_factory=dict)
    # speculative decoding: a verifying sequence's tokens (accepted proposals, then the target's own), and
    # a draft model's proposals for each sequence's next step
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    draft_token_ids: dict[str, list[int]] = field(default_factory=dict)
    # pipeline parallel: this stage's compute time and the step's wall time (for the bubble)
    busy_s: float = 0.0
    wall_s: float = 0.0
    # the step's time on the device (CUDA events on a GPU, wall time on a CPU), for the step-time model
    device_time_s: float = 0.0
    # how long the host waited for the step to finish when it read it back (0: the device was done first,
    # the host is the slower side); in the step trace, to tell a host-bound engine from a device-bound one
    host_wait_s: float = 0.0


class StepTimer:
    """Device time of one step: CUDA events on a GPU (read once the step is done), wall time on a CPU."""

    def __init__(self, device: torch.device):
        self._cuda = device.type == "cuda"
        self._elapsed = 0.0
        self._end: torch.cuda.Event | None = None
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()

    def stop(self) -> StepTimer:
        if self._cuda:
            self._end = torch.cuda.Event(enable_timing=True)
            self._end.record()
        else:
            self._elapsed = time.perf_counter() - self._t0
        return self

    def elapsed_s(self) -> float:
        """Waits for the step's end on a GPU."""
        if self._end is not None:
            self._end.synchronize()
            self._elapsed, self._end = self._start.elapsed_time(self._end) / 1e3, None
        return self._elapsed


class PendingOutput:
    """A launched step whose sampled ids are on their way to pinned host memory; result() waits for them.

    Lets the engine schedule and launch step n+1 before it reads step n's tokens (async scheduling).
    result() may be called more than once; the first call fills the ModelRunnerOutput in.
    """

    def __init__(self, output: ModelRunnerOutput, seq_ids: list[str] | None = None,
                 host_ids: torch.Tensor | None = None, event: torch.cuda.Event | None = None,
                 sampled=None, logprob_ks: list[int | None] | None = None, spec_seq_ids: list[str] | None = None,
                 spec_rows: torch.Tensor | None = None):
        self._output = output
        self._seq_ids, self._host_ids, self._event = seq_ids, host_ids, event
        self._sampled, self._logprob_ks = sampled, logprob_ks
        # speculative decoding: verify rows (rejection_sampler.verify_on_device), copied to the host with the ids
        self._spec_seq_ids, self._spec_rows = spec_seq_ids, spec_rows
        self.timer: StepTimer | None = None  # set by the runner: the step's device time, read with the result

    def result(self) -> ModelRunnerOutput:
        t0 = time.perf_counter()
        if self.timer is not None:
            self._output.device_time_s = self.timer.elapsed_s()
            self.timer = None
        if self._event is not None and (self._spec_seq_ids is not None or self._seq_ids is not None):
            self._event.synchronize()
        self._output.host_wait_s += time.perf_counter() - t0  # the waits above only (a GPU's events)
        if self._spec_seq_ids is not None:
            # each row: accepted count a, the target's own token, the proposals -> accepted ones + own
            self._output.spec_token_ids.update((seq_id, row[2 : 2 + row[0]] + [row[1]])
                                               for seq_id, row in zip(self._spec_seq_ids, self._spec_rows.tolist()))
            self._spec_seq_ids = self._spec_rows = None
        if self._seq_ids is not None:
            out = self._output
            out.sampled.update(zip(self._seq_ids, self._host_ids.tolist()))
            sampled = self._sampled
            if sampled is not None and sampled.logprobs is not None:
                infos = to_token_logprobs(sampled.sampled_token_ids, sampled.logprobs, sampled.ranks,
                                          sampled.top_token_ids, sampled.top_logprobs)
                for seq_id, k, info in zip(self._seq_ids, self._logprob_ks, infos):
                    if k is not None:
                        info.top_ids, info.top_logprobs = info.top_ids[:k], info.top_logprobs[:k]
                        out.logprobs[seq_id] = info
            self._seq_ids = self._sampled = None
        return self._output


def to_token_logprobs(ids, lps, ranks, top_ids, top_lps) -> list[TokenLogprobs]:
    """TokenLogprobs per row from the sampler's (or compute_logprobs') tensors."""
    return [TokenLogprobs(i, lp, r, ti, tl) for i, lp, r, ti, tl in
            zip(ids.tolist(), lps.tolist(), ranks.tolist(), top_ids.tolist(), top_lps.tolist())]


class DeferredOutput:
    """A launched step whose sampling is not queued yet: its grammar masks are being filled on a thread while
    the host goes on (outputs, the next schedule). The runner queues the sampling when the next step is
    launched (before its inputs, which read this step's tokens on the device), or here when the step is read
    back first; result() then is the sampling's PendingOutput's."""

    def __init__(self, finish) -> None:
        self._finish = finish  # the runner's: queues the sampling, then sets self.target
        self.target: PendingOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self.target is None:
            self._finish()
        return self.target.result()
