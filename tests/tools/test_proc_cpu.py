"""tools/proc_cpu.py: snapshots of a real process tree, and the shares diff computes from two snapshots."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("proc_cpu", Path(__file__).parents[2] / "tools" / "proc_cpu.py")
proc_cpu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(proc_cpu)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_snapshot_holds_this_process_main_thread_with_its_cpu_time():
    sum(i * i for i in range(300_000))  # some CPU time of our own
    snap = proc_cpu.snapshot(os.getpid())
    me = snap["threads"][f"{os.getpid()}/{os.getpid()}"]
    # labelled by its name and what it runs (pytest, or an xdist worker's `-c ...`)
    args = [a.decode() for a in open("/proc/self/cmdline", "rb").read().split(b"\0")[1:] if a and a != b"-m"]
    assert me["thread"] == "main" and me["cpu_s"] > 0
    assert me["process"].startswith(open("/proc/self/comm").read().strip()) and args[0][:8] in me["process"]


def test_diff_gives_cpu_share_of_wall_time_busiest_first():
    a = {"t": 10.0, "threads": {"1/1": {"process": "api", "thread": "main", "cpu_s": 1.0},
                                "2/2": {"process": "core", "thread": "main", "cpu_s": 5.0}}}
    b = {"t": 12.0, "threads": {"1/1": {"process": "api", "thread": "main", "cpu_s": 2.9},
                                "2/2": {"process": "core", "thread": "main", "cpu_s": 6.0},
                                "2/3": {"process": "core", "thread": "new", "cpu_s": 0.02}}}
    rows = proc_cpu.diff(a, b)
    assert [(r[0], round(r[3], 3)) for r in rows] == [("1/1", 0.95), ("2/2", 0.5)]  # 2/3: 1% < 5%
