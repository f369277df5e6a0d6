"""A producer EngineCore in its own process, driven over multiprocessing queues (for the disagg tests)."""

from __future__ import annotations

import queue
import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join(proc, timeout: float) -> None:
    """proc.join(timeout), but by its exit status: Process.join waits for its sentinel pipe, which a
    grandchild can keep open (torch_shm_manager, started for a CPU pool shared by file name: ipc)."""
    deadline = time.monotonic() + timeout
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.05)


def started_pair(conns: list):
    """Start a producer / consumer connector pair at once (each start waits for its peer), yield it, close it."""
    threads = [threading.Thread(target=c.start) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    yield conns
    for c in reversed(conns):
        c.close()


def transfer_config(role: str, rank: int, port: int, size: int = 2, connector: str = "torch", **extra) -> dict:
    return {
        "kv_connector": connector,
        "kv_role": role,
        "kv_rank": rank,
        "kv_parallel_size": size,
        "kv_ip": "127.0.0.1",
        "kv_port": port,
        "kv_connector_extra_config": {"backend": "gloo", **extra},
    }


def _fault(kind: str | None):
    """A layer-wise sender fault (LayerSender.skip): "drop_layer_1" loses layer 1's tensors, "stall" every
    layer and the end of the stream (a producer that hangs), None none."""
    if kind == "drop_layer_1":
        return lambda job: job.kind == "layer" and job.layer == 1
    if kind == "stall":
        return lambda job: True
    return None


def producer_main(engine_kwargs: dict, commands, results) -> None:
    """Serve ("add", EngineCoreRequest) commands; report each finished request's tokens (with its cached prompt
    tokens and its kv_transfer_params handle), and on ("blocks",)
    the free-block count once nothing is held (or after 10 s); ("fault", kind) sets a layer-wise sender
    fault (_fault); stop on ("stop",)."""
    from meshserve.config import EngineArgs
    from meshserve.engine.core import EngineCore

    try:
        core = EngineCore.from_engine_args(EngineArgs(**engine_kwargs))
    except BaseException as e:  # the test waits on this queue: name the cause rather than time out
        results.put(("failed", f"{type(e).__name__}: {e}"))
        raise
    results.put(("ready", core.scheduler.block_manager.num_blocks))
    tokens: dict[str, list[int]] = {}
    try:
        while True:
            try:
                cmd = commands.get(timeout=0.01 if not core.has_unfinished_requests() else 0)
            except queue.Empty:
                cmd = None
            if cmd is not None and cmd[0] == "stop":
                break
            if cmd is not None and cmd[0] == "fault":
                core.disagg.connector.sender.skip = _fault(cmd[1])
                results.put(("fault", cmd[1]))
            if cmd is not None and cmd[0] == "add":
                core.add_request_or_report(cmd[1])
            if cmd is not None and cmd[0] == "blocks":
                deadline = time.monotonic() + 10
                while core.disagg.stats.held_blocks and time.monotonic() < deadline:
                    core.step()
                    time.sleep(0.01)
                results.put(("blocks", core.scheduler.block_manager.num_free_blocks, core.disagg.snapshot()))
            if core.has_unfinished_requests():
                outs = core.step()
                for o in outs.outputs:
                    tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                    if o.finished:
                        results.put(("done", o.request_id, tokens.pop(o.request_id), o.num_cached_tokens,
                                     o.kv_transfer_params))
                for e in outs.errors:
                    results.put(("error", e.request_id, e.message))
    finally:
        core.shutdown()
