"""Liveness of rank 0's call channel while the engine idles.

Workers wait for rank 0's next call on a gloo group without the collective timeout (parallel_state.call_group:
an idle engine is not a failure). A driver that dies closes its sockets and the wait ends with an error; one
whose node vanishes (power, partition) closes nothing. So rank 0 sends a no-op call whenever it has sent
nothing for a third of the timeout (CallKeepalive), and a worker that has waited for a call much longer than
that leaves (SilenceWatchdog): a lost driver is noticed within silence_limit_s, as a hung peer is within the
timeout.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)

NOOP = "noop"  # the call name workers skip


def silence_limit_s(timeout_s: float) -> float:
    """How long a worker waits for any call from rank 0 before it leaves: twice the collective timeout, with
    room for a busy host's scheduling (keepalives come every timeout / 3)."""
    return 2 * timeout_s + 10.0


class CallKeepalive:
    """Rank 0's side: every call goes through send() (one at a time); a thread sends a no-op after
    timeout_s / 3 without one, until stop()."""

    def __init__(self, timeout_s: float):
        self._interval = timeout_s / 3
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._broadcast: Callable[[tuple], object] | None = None
        self._thread: threading.Thread | None = None

    def send(self, broadcast: Callable[[tuple], object], call: tuple, last: bool = False) -> None:
        """broadcast(call), serialised with the keepalives; the first call starts them, a last one (shutdown)
        ends them in the same hold of the lock, so no keepalive follows it."""
        with self._lock:
            if self._stopped.is_set():
                raise RuntimeError("the call channel is closed")
            if last:
                self._stopped.set()
            broadcast(call)
            self._last = time.monotonic()
            if self._thread is None and not last:
                self._broadcast = broadcast
                self._thread = threading.Thread(target=self._run, name="meshserve-call-keepalive",
                                                daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """No more keepalives (at most one already under way: the workers are being stopped anyway). Does not
        take the lock: a keepalive blocked on a dead worker holds it."""
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.wait(self._interval / 2):
            with self._lock:
                if self._stopped.is_set() or time.monotonic() - self._last < self._interval:
                    continue
                try:
                    self._broadcast((NOOP, ()))
                except Exception:  # noqa: BLE001  (a dead peer: the next real call reports it)
                    return
                self._last = time.monotonic()


class SilenceWatchdog:
    """A worker's side: wrap each wait for a call in waiting(); once a first call has come, a wait longer than
    limit_s ends the process (exit code 1), naming the silence. exit_process is os._exit, replaceable in tests."""

    def __init__(self, rank: int, limit_s: float, exit_process: Callable[[int], None] = os._exit):
        self._rank = rank
        self._limit = limit_s
        self._exit = exit_process
        self._since: float | None = None  # when the current wait began; None while working
        self._armed = False  # the first call came: rank 0 is past its start-up
        self._thread = threading.Thread(target=self._run, name="meshserve-call-watchdog", daemon=True)
        self._thread.start()

    def waiting(self):
        return _Waiting(self)

    def _run(self) -> None:
        while True:
            time.sleep(min(1.0, self._limit / 4))
            since = self._since
            if self._armed and since is not None and time.monotonic() - since > self._limit:
                logger.error("rank %d: no call from rank 0 for %.0f s (keepalives stopped: its process or node is "
                             "gone); leaving", self._rank, time.monotonic() - since)
                self._exit(1)
                return


class _Waiting:
    def __init__(self, dog: SilenceWatchdog):
        self._dog = dog

    def __enter__(self) -> None:
        self._dog._since = time.monotonic()

    def __exit__(self, *exc) -> None:
        self._dog._since = None
        self._dog._armed = True
