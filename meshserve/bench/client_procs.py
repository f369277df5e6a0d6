"""`bench serve --client-procs N`: one load point's requests sent from N client processes.

One asyncio process cannot send W3's QPS 96 on time (its send lag p99 reached 4-5 s on an H200 host: the
loop is busy parsing ~12k SSE chunks a second), so past the knee TTFT and ITL measured the client. Here
request i goes to worker i % N (the same draws as with one process), each worker is a spawned process with
its own event loop and HTTP client, all start at one absolute time, and the parent merges the records back
into request order: summaries, JSON and the BENCHMARKS.md row read them exactly as with one process.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from meshserve.bench.serve_bench import BenchRequest, RequestResult, run_load
from meshserve.errors import MeshserveError

START_MARGIN_S = 0.25  # from "every worker is ready" to the shared start: time for each to open its client
READY_TIMEOUT_S = 120.0  # a spawned worker imports numpy and httpx: seconds on a loaded host, never minutes


def split_requests(reqs: list[BenchRequest], num_procs: int) -> list[list[BenchRequest]]:
    """Worker k's share: requests k, k + N, k + 2N, ... (arrivals stay interleaved across workers)."""
    return [reqs[k::num_procs] for k in range(num_procs)]


def split_concurrency(concurrency: int | None, num_procs: int) -> list[int | None]:
    """A closed loop's slots divided so the workers together keep `concurrency` requests in flight."""
    if concurrency is None:
        return [None] * num_procs
    return [concurrency // num_procs + (k < concurrency % num_procs) for k in range(num_procs)]


def merge_results(shares: list[tuple[list[RequestResult], float]]) -> tuple[list[RequestResult], float]:
    """Worker k's records back at indices k, k + N, ...; the run lasts until its last worker finished."""
    num_procs = len(shares)
    merged: list[RequestResult | None] = [None] * sum(len(results) for results, _ in shares)
    for k, (results, _) in enumerate(shares):
        merged[k::num_procs] = results
    return merged, max(duration for _, duration in shares)  # type: ignore[return-value]


def client_worker(
    conn: Connection,
    base_url: str,
    model: str,
    reqs: list[BenchRequest],
    concurrency: int | None,
    load_kwargs: dict[str, Any],
    num_done: Any,
) -> None:
    """A spawned worker: report ready, take the shared start (wall clock), send its share, return records."""
    try:
        import httpx  # noqa: F401 - imported before "ready": inside the run it made the first requests late

        conn.send(("ready", None))
        start_wall = conn.recv()
        # perf_counter's origin differs between processes; the wall clock does not (over a run's seconds)
        start_at = time.perf_counter() + (start_wall - time.time())

        def on_done() -> None:
            with num_done.get_lock():
                num_done.value += 1

        share = asyncio.run(
            run_load(
                base_url,
                model,
                reqs,
                concurrency=concurrency,
                progress=False,
                start_at=start_at,
                on_done=on_done,
                **load_kwargs,
            )
        )
        conn.send(("results", share))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which names the worker
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        except OSError:
            pass
    finally:
        conn.close()


def run_load_in_procs(
    num_procs: int,
    base_url: str,
    model: str,
    reqs: list[BenchRequest],
    *,
    concurrency: int | None = None,
    progress: bool = True,
    **load_kwargs: Any,
) -> tuple[list[RequestResult], float]:
    """`run_load` over `num_procs` processes (at most one per request or closed-loop slot)."""
    num_procs = max(1, min(num_procs, len(reqs), concurrency or len(reqs)))
    ctx = mp.get_context("spawn")  # fork would copy this process's threads and event loop state
    num_done = ctx.Value("i", 0)
    conns: list[Connection] = []
    procs = []
    finished = False
    try:
        for k, (share, slots) in enumerate(
            zip(split_requests(reqs, num_procs), split_concurrency(concurrency, num_procs))
        ):
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(
                target=client_worker,
                name=f"meshserve-bench-client-{k}",
                daemon=True,
                args=(child_end, base_url, model, share, slots, load_kwargs, num_done),
            )
            proc.start()
            child_end.close()  # the worker's end closes with it: a dead worker reads as EOF, not a hang
            conns.append(parent_end)
            procs.append(proc)
        _collect(conns, procs, "ready", timeout=READY_TIMEOUT_S)
        start_wall = time.time() + START_MARGIN_S
        for conn in conns:
            conn.send(start_wall)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(reqs), desc="requests", dynamic_ncols=True, file=sys.stderr)
        shares = _collect(
            conns,
            procs,
            "results",
            on_tick=(lambda: bar.update(num_done.value - bar.n)) if bar is not None else None,
        )
        if bar is not None:
            bar.update(num_done.value - bar.n)
            bar.close()
        finished = True
        return merge_results(shares)
    finally:
        for conn in conns:
            conn.close()
        for proc in procs:
            if not finished:  # an error or Ctrl-C: the other workers' requests no longer count
                proc.terminate()
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()


def _collect(
    conns: list[Connection], procs: list, kind: str, timeout: float | None = None, on_tick=None
) -> list[Any]:
    """One `kind` message from every worker, in worker order; a worker's error or death raises."""
    got: dict[int, Any] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while len(got) < len(conns):
        pending = [c for k, c in enumerate(conns) if k not in got]
        for conn in wait(pending, timeout=0.25):
            k = conns.index(conn)
            try:
                tag, payload = conn.recv()
            except EOFError:
                procs[k].join(timeout=1)
                raise MeshserveError(
                    f"client process {k} exited (code {procs[k].exitcode}) before sending its {kind}"
                ) from None
            if tag == "error":
                raise MeshserveError(f"client process {k} failed: {payload}")
            got[k] = payload
        if on_tick is not None:
            on_tick()
        if deadline is not None and time.monotonic() > deadline:
            raise MeshserveError(f"client processes not {kind} after {timeout:.0f} s")
    return [got[k] for k in range(len(conns))]
