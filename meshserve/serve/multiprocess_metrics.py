"""prometheus_client's multiprocess mode, shared by the API server's N processes and the router's N workers.

Several processes serve one port and a scrape reaches one of them at random, so each process writes its
series to mmap files in one directory (PROMETHEUS_MULTIPROC_DIR) and whichever answers a scrape merges every
process's files: counters and histograms summed, gauges by their multiprocess_mode. The variable must be set
before prometheus_client is first imported (it picks its value class at import), hence `enter` is the first
thing a spawned child does. A dead process's live-mode gauge files are removed (`mark_dead`); its counter
files stay, so counters never go down when a process is restarted.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

ENV = "PROMETHEUS_MULTIPROC_DIR"


def new_dir() -> str:
    """A fresh directory for one server's processes (the parent removes it with `remove_dir`)."""
    return tempfile.mkdtemp(prefix="meshserve-metrics-")


def remove_dir(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


def enter(path: str) -> None:
    """Make this process write its series under path; call before anything imports prometheus_client."""
    if "prometheus_client" in sys.modules:
        raise RuntimeError(f"{ENV} set after prometheus_client was imported: this process's series "
                             "would not be shared")
    os.environ[ENV] = path


def active() -> bool:
    return bool(os.environ.get(ENV))


def mark_dead(path: str, pid: int) -> None:
    """Drop a dead process's live gauges (livesum, livemin, ...): they describe nothing any more."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, path)


def merged_metrics():
    """Every process's series, merged (a list of Metric)."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    return list(MultiProcessCollector(CollectorRegistry()).collect())


def render(registry, *extra) -> bytes:
    """The exposition text: registry's own series in one process; with several, every process's series
    merged; plus the collectors in extra (series every process computes alike, or from the merged ones)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    if not active():
        return generate_latest(registry)
    merged = CollectorRegistry()
    MultiProcessCollector(merged)
    for collector in extra:
        merged.register(collector)
    return generate_latest(merged)
