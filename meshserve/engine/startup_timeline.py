"""The start-up timeline: when each phase of bringing an engine up ended, in every process that takes part.

One `Segment` per process (the CLI / API process, the engine core, each worker rank): its start (the process's
own start, read from /proc) and a mark at the end of each phase, in wall-clock seconds, so that segments of
different processes line up. Every process measures against the launch: the `meshserve` command's process start,
passed to its children in MESHSERVE_LAUNCH_TIME (spawned processes inherit the environment). The core sends its
segments (its own and its worker ranks') to the front end in CoreInfo.startup; the front end logs the whole
start-up once, as one line, when it is ready (`summary`).

A phase's duration is the time from the segment's previous mark (or the process's start) to its own mark, so
whatever is not marked is charged to the next phase that is: nothing goes missing. Each mark also holds the
seconds this process had spent building Triton kernels by then (kernels/triton_build_clock.py), so a cold
Triton cache shows as its own share of the warm-ups.
"""

from __future__ import annotations

import multiprocessing
import os
import time

import msgspec

from meshserve.kernels import triton_build_clock

LAUNCH_ENV = "MESHSERVE_LAUNCH_TIME"


class Mark(msgspec.Struct, array_like=True):
    phase: str
    t: float  # wall-clock time.time() at the phase's end
    triton_s: float = 0.0  # Triton build seconds of this process so far
    triton_n: int = 0


class Segment(msgspec.Struct):
    """One process's phases."""

    label: str
    pid: int
    start: float  # wall-clock time this segment began (its process's start, or a later engine's)
    launch: float  # what its times count from: the command's launch, or a later engine's own begin
    marks: list[Mark] = []

    def phases(self) -> list[tuple[str, float, float, int]]:
        """(phase, seconds, Triton build seconds, Triton builds) of each phase, in order."""
        out = []
        t, ts, tn = self.start, 0.0, 0
        for m in self.marks:
            out.append((m.phase, m.t - t, m.triton_s - ts, m.triton_n - tn))
            t, ts, tn = m.t, m.triton_s, m.triton_n
        return out

    @property
    def end(self) -> float:
        return self.marks[-1].t if self.marks else self.start


def process_start_time() -> float:
    """This process's start in wall-clock seconds (/proc: 10 ms resolution); now where /proc is missing."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - max(0.0, age)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def launch_time() -> float:
    """When the command started: inherited from the parent, else this process's start (then passed down)."""
    value = os.environ.get(LAUNCH_ENV)
    if value:
        try:
            return float(value)
        except ValueError:
            pass
    t = process_start_time()
    os.environ[LAUNCH_ENV] = repr(t)
    return t


_segment: Segment | None = None
_handed_over = False  # the segment under way continues in the next begin() (the CLI's, into the server's)


def begin(label: str | None = None, hand_over: bool = False) -> Segment:
    """A new segment for this process, labelled `label`: from the process's start for its first one, from now
    for a later engine's. Where the last one was begun with hand_over (the CLI's phases before the server it
    starts), that one continues under the new label instead."""
    global _segment, _handed_over
    pid = os.getpid()
    label = label or multiprocessing.current_process().name
    if _segment is not None and _segment.pid == pid and _handed_over:
        _segment.label = label
    elif _segment is not None and _segment.pid == pid:
        now = time.time()
        _segment = Segment(label, pid, now, now)
    else:  # the first in this process (a forked child starts its own)
        _segment = Segment(label, pid, process_start_time(), launch_time())
    _handed_over = hand_over
    return _segment


def current() -> Segment:
    """This process's segment under way (begun on first use)."""
    if _segment is None or _segment.pid != os.getpid():
        return begin()
    return _segment


def mark(phase: str, sync=None) -> None:
    """The phase `phase` of this process ends now; sync: a device whose queued work belongs to this phase
    (a CUDA device is synchronized first, so asynchronous launches are charged where they were made)."""
    if sync is not None and str(sync).startswith("cuda"):
        import torch

        torch.cuda.synchronize(sync)
    seconds, count = triton_build_clock.totals()
    current().marks.append(Mark(phase, time.time(), seconds, count))


def merge(own: Segment, others: list[Segment]) -> list[Segment]:
    """own first, then the other processes' segments (one in this process is already in own)."""
    return [own] + [s for s in others if s.pid != own.pid]


def summary(segments: list[Segment], launch: float | None = None) -> str:
    """One line: each process's phases in seconds, when it started and was done, and the total."""
    launch = segments[0].launch if launch is None else launch
    parts = []
    for s in segments:
        phases = []
        for phase, secs, triton_s, triton_n in s.phases():
            note = f" (Triton {triton_s:.1f} s, {triton_n} kernels)" if triton_n else ""
            phases.append(f"{phase} {secs:.1f}{note}")
        parts.append(f"{s.label} [{s.start - launch:+.1f}]: {', '.join(phases)} -> {s.end - launch:.1f}")
    total = max(s.end for s in segments) - launch
    return f"start-up, seconds since launch: {' | '.join(parts)} (ready in {total:.1f} s)"


def ready_seconds(segments: list[Segment], launch: float | None = None) -> float:
    launch = segments[0].launch if launch is None else launch
    return max(s.end for s in segments) - launch
