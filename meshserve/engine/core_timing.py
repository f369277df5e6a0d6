"""MESHSERVE_CORE_TIMING=PATH (or bench frontend_server --real-core --core-timing PATH): the engine core thread's CPU
time per loop iteration, on any device, written as JSON lines on shutdown.

An iteration is the commands the core loop took (requests in, aborts), then one step, then publishing its
outputs. Each row has the iteration's wall time (iter_wall_s: its CPU, the waits for the device, and any time
the thread could not run: a busy machine, another thread holding the GIL) and splits its thread CPU
(time.thread_time: a wait for the device does not count, a spinning one does) into the step and its
STEP_PARTS, the intake (add/abort/idle outputs) and the rest of the loop (the ZeroMQ receive and decode,
publishing); the garbage collector's CPU within it (gc_cpu_s, wherever a collection struck) and its full
collections (gc_full). The wrappers cost a few microseconds a step and exist only while timing is on.
"""

from __future__ import annotations

import gc
import json
import os
import time

# parts of the step timed apart (thread CPU), some nested: the scheduler; the runner's launch (its _prepare
# inside); the read-back of the step before (drain: the wait for its ids, a spinning one on a GPU, then process);
# processing its tokens (process: the step-time model and trace, observe, inside); the counters (stats)
STEP_PARTS = ("schedule", "launch", "prepare", "drain", "process", "observe", "stats")


class CoreTiming:
    """The core thread's CPU time per loop iteration (one iteration = the commands taken, then one step),
    split into the step (and its STEP_PARTS), the intake (add/abort/idle outputs) and the rest (the loop's
    ZeroMQ receive and decode, and publishing). An iteration is closed when the next step starts."""

    def __init__(self, core, path: str):
        self.core, self.path = core, path
        self.rows: list[tuple] = []
        self._intake = 0.0
        self._adds = 0
        self._iter_start: float | None = None
        self._parts = dict.fromkeys(STEP_PARTS, 0.0)
        self._gc, self._gc_full, self._gc_t0 = 0.0, 0, 0.0  # the collector's CPU in this iteration, full collections
        gc.callbacks.append(self._on_gc)
        for name in ("add_request_or_report", "abort_requests", "idle_outputs"):
            setattr(core, name, self._intake_timed(getattr(core, name)))
        runner = getattr(core.executor, "runner", None)  # rank 0's in-process runner, if any
        for obj, attr, part in ((core, "_schedule", "schedule"), (core.executor, "execute_async", "launch"),
                                (runner, "_prepare", "prepare"), (core, "_drain", "drain"),
                                (core, "_process", "process"),
                                (core, "_observe_step", "observe"), (core, "scheduler_stats", "stats")):
            if obj is not None:
                setattr(obj, attr, self._part_timed(getattr(obj, attr), part))
        step, shutdown = core.step, core.shutdown

        def timed_step():
            t0, w0 = time.thread_time(), time.perf_counter()
            scheduler = self.core.scheduler
            running, waiting = scheduler.num_running, scheduler.num_waiting
            self._parts = dict.fromkeys(STEP_PARTS, 0.0)  # what runs outside a step (intake's stats) is not counted
            out = step()
            t1 = time.thread_time()
            if self._iter_start is not None:
                # the iteration before this step: from the last step's start to this one's
                self.rows.append((time.monotonic(), t0 - self._iter_start, w0 - self._iter_wall_start, self._step_s,
                                  self._intake, self._adds, self._running, self._waiting, self._num_outputs,
                                  self._step_parts, self._gc, self._gc_full))
            self._iter_start, self._iter_wall_start, self._step_s, self._intake, self._adds = t0, w0, t1 - t0, 0.0, 0
            self._gc, self._gc_full = 0.0, 0
            self._step_parts = self._parts
            self._running, self._waiting, self._num_outputs = running, waiting, len(out.outputs)
            return out

        def timed_shutdown():
            if self._on_gc in gc.callbacks:
                gc.callbacks.remove(self._on_gc)
            self.write()
            shutdown()

        core.step, core.shutdown = timed_step, timed_shutdown

    def _intake_timed(self, fn):
        def wrapper(*args):
            t = time.thread_time()
            try:
                return fn(*args)
            finally:
                self._intake += time.thread_time() - t
                self._adds += fn.__name__ == "add_request_or_report"
        return wrapper

    def _on_gc(self, phase: str, info: dict) -> None:
        """The collector's CPU (any thread's collection: the core loop's in practice), counted in the iteration."""
        if phase == "start":
            self._gc_t0 = time.thread_time()
        else:
            self._gc += time.thread_time() - self._gc_t0
            self._gc_full += info.get("generation") == 2

    def _part_timed(self, fn, part: str):
        def wrapper(*args, **kwargs):
            t = time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self._parts[part] += time.thread_time() - t
        return wrapper

    def write(self) -> None:
        keys = ("t", "iter_cpu_s", "iter_wall_s", "step_cpu_s", "intake_cpu_s", "adds", "running", "waiting", "outputs",
                "step_parts_s", "gc_cpu_s", "gc_full")
        with open(self.path, "w") as f:
            f.writelines(json.dumps(dict(zip(keys, row))) + "\n" for row in self.rows)


def attach_from_env(core) -> CoreTiming | None:
    """MESHSERVE_CORE_TIMING=PATH: time core, written to PATH.<pid>.jsonl on shutdown; unset: nothing."""
    path = os.environ.get("MESHSERVE_CORE_TIMING")
    if not path or not hasattr(core, "executor"):  # (a bench's fake core has no executor to time)
        return None
    return CoreTiming(core, f"{path}.{os.getpid()}.jsonl")
