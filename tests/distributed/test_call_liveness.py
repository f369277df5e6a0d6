"""distributed/call_liveness: rank 0's no-op calls while idle, and a worker leaving when they stop."""

from __future__ import annotations

import threading
import time

import pytest

from meshserve.distributed.call_liveness import NOOP, CallKeepalive, SilenceWatchdog, silence_limit_s
from tests.waiting import wait_until


class Recorder:
    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, call: tuple) -> None:
        self.calls.append(call)

    def noops(self) -> int:
        return sum(c[0] == NOOP for c in self.calls)


def test_keepalives_fill_idle_time_and_end_with_the_last_call():
    sent, keep = Recorder(), CallKeepalive(timeout_s=0.3)  # a no-op after 0.1 s without a call
    keep.send(sent, ("execute", ()))
    assert wait_until(lambda: sent.noops() >= 3, 5, 0.01)
    keep.send(sent, ("shutdown", ()), last=True)
    after = len(sent.calls)
    time.sleep(0.4)  # four keepalive intervals: none may come after the last call
    assert sent.calls[after - 1] == ("shutdown", ()) and len(sent.calls) == after
    with pytest.raises(RuntimeError, match="closed"):
        keep.send(sent, ("execute", ()))


def test_no_keepalive_while_calls_flow_or_before_the_first_or_after_stop():
    # interval 1 s: calls 0.05 s apart leave room on a busy host
    sent, keep = Recorder(), CallKeepalive(timeout_s=3.0)
    time.sleep(1.5)
    assert sent.calls == []  # nothing before the first call (rank 0 may still be loading)
    for _ in range(10):
        keep.send(sent, ("execute", ()))
        time.sleep(0.05)
    assert sent.noops() == 0
    keep.stop()
    time.sleep(1.5)  # past the interval: a keepalive would have come
    assert sent.noops() == 0


def test_watchdog_leaves_only_after_a_first_call_and_a_long_silence():
    exits: list[int] = []
    dog = SilenceWatchdog(rank=1, limit_s=1.0, exit_process=exits.append)
    with dog.waiting():
        time.sleep(1.5)  # the wait for the first call (start-up) is never cut
    assert exits == []
    with dog.waiting():
        time.sleep(0.1)  # a call well within the limit, even on a busy host
    assert exits == []
    done = threading.Event()

    def silent_wait():
        with dog.waiting():
            done.wait(5)

    t = threading.Thread(target=silent_wait)
    t.start()
    assert wait_until(lambda: exits == [1], 10, 0.02)
    done.set()
    t.join()


def test_silence_limit_leaves_room_past_the_keepalive_interval():
    assert silence_limit_s(60) == 130 and silence_limit_s(2) > 3 * 2 / 3
