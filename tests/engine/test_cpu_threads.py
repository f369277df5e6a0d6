"""torch's CPU threads per rank: the cores shared by the local ranks, less what other work keeps busy."""

from __future__ import annotations

import os

from meshserve.engine import cpu_threads


def test_threads_follow_cores_ranks_load_and_omp(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert cpu_threads.choose_cpu_threads(1)[0] == 8
    assert cpu_threads.choose_cpu_threads(4)[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (6.0, 0.0, 0.0))  # six cores busy elsewhere
    assert cpu_threads.choose_cpu_threads(1)[0] == 2
    assert cpu_threads.choose_cpu_threads(4)[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert cpu_threads.choose_cpu_threads(1)[0] == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_threads.choose_cpu_threads(4) == (3, "OMP_NUM_THREADS")
