"""How busy each thread of a process tree was between two snapshots: is a server's front end or its engine core
the saturated side (one thread near 100% of a core is a bottleneck whatever the GPU does)?

    python tools/proc_cpu.py snap PID > A.json; ...; python tools/proc_cpu.py snap PID > B.json
    python tools/proc_cpu.py diff A.json B.json [--min-share 0.05]
    python tools/proc_cpu.py watch PID [INTERVAL_S]   # a line per interval until killed: the busiest threads
                                                      # (PID 0: of every process, the bench client's too)
    python tools/proc_cpu.py log PID [INTERVAL_S] > F.jsonl  # a JSON line per interval until killed: wall time
                                                      # and each process's CPU seconds so far (to integrate
                                                      # any window afterwards, e.g. an API process per QPS point)

A snapshot holds, for PID and every process below it, each thread's name and CPU time (user + system, from
/proc/PID/task/TID/stat) with the time it was taken; diff prints the threads' CPU time over the wall time
between the snapshots (1.0 = one core busy all the time), busiest first. Linux only; no dependencies.
"""

from __future__ import annotations

import json
import os
import sys
import time

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(path: str) -> tuple[str, int, float] | None:
    """(name, parent pid, CPU seconds) of /proc/.../stat; None when the process or thread is gone."""
    try:
        text = open(path).read()
    except OSError:
        return None
    name = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is the state (field 3 of stat)
    return name, int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _children(root: int) -> list[int]:
    """root and every process below it; root 0: every process (the bench client too)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(f"/proc/{entry}/stat")
            if st is not None:
                parents[int(entry)] = st[1]
    if root == 0:
        return list(parents)
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        tree += frontier
    return tree


def _label(pid: int, name: str) -> str:
    """The process's name and what it runs (python's module or script and first arguments: which python is
    the API server, the engine core, the bench client)."""
    try:
        args = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace").split("\0")
    except OSError:
        return name
    args = [a for a in args[1:] if a and a != "-m" and not a.startswith("-B")][:3]
    return f"{name} {' '.join(args)}"[:48]


def snapshot(root: int) -> dict:
    threads = {}
    for pid in _children(root):
        proc = _stat(f"/proc/{pid}/stat")
        if proc is not None:
            label = _label(pid, proc[0])
            if "multiprocessing" in label:  # a spawned child (the engine core, a client process): say whose
                parent = _stat(f"/proc/{proc[1]}/stat")
                label = f"child of {_label(proc[1], parent[0]) if parent else proc[1]}"
            proc = (label, *proc[1:])
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            st = _stat(f"/proc/{pid}/task/{tid}/stat")
            if st is not None and proc is not None:
                name = "main" if tid == str(pid) else st[0]
                threads[f"{pid}/{tid}"] = {"process": proc[0], "thread": name, "cpu_s": st[2]}
    return {"t": time.monotonic(), "threads": threads}


def diff(a: dict, b: dict, min_share: float = 0.05) -> list[tuple[str, str, str, float]]:
    """(pid/tid, process, thread, CPU share of the wall time), busiest first, those above min_share."""
    wall = b["t"] - a["t"]
    rows = []
    for key, th in b["threads"].items():
        before = a["threads"].get(key, {"cpu_s": 0.0})["cpu_s"]
        share = (th["cpu_s"] - before) / wall if wall > 0 else 0.0
        if share >= min_share:
            rows.append((key, th["process"], th["thread"], share))
    return sorted(rows, key=lambda r: -r[3])


def watch(root: int, interval_s: float) -> None:
    start = prev = snapshot(root)
    while True:
        time.sleep(interval_s)
        cur = snapshot(root)
        top = diff(prev, cur)[:5]
        print(f"t+{cur['t'] - start['t']:5.1f}s " + "  ".join(f"{share:4.0%} {proc}/{thread}({key.split('/')[1]})"
                                                         for key, proc, thread, share in top), flush=True)
        prev = cur


def log(root: int, interval_s: float) -> None:
    """Cumulative CPU seconds per process (its threads summed), one JSON line per interval, with time.time()."""
    while True:
        snap = snapshot(root)
        per_proc: dict[str, dict] = {}
        for key, th in snap["threads"].items():
            entry = per_proc.setdefault(key.split("/")[0], {"process": th["process"], "cpu_s": 0.0})
            entry["cpu_s"] += th["cpu_s"]
        print(json.dumps({"t_wall": time.time(), "procs": per_proc}), flush=True)
        time.sleep(interval_s)


def main() -> None:
    if sys.argv[1] in ("watch", "log"):
        (watch if sys.argv[1] == "watch" else log)(int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)
        return
    if sys.argv[1] == "snap":
        print(json.dumps(snapshot(int(sys.argv[2]))))
        return
    a, b = (json.load(open(p)) for p in sys.argv[2:4])
    min_share = float(sys.argv[sys.argv.index("--min-share") + 1]) if "--min-share" in sys.argv else 0.05
    for key, proc, thread, share in diff(a, b, min_share):
        print(f"  {share:5.0%}  {proc} / {thread} ({key})")


if __name__ == "__main__":
    main()
