"""The KV link alone: one request's blocks pulled between two processes by a connector, no engines.

`python -m meshserve.bench.kv_link --connector nixl` (or torch, ipc): a producer process holds `--repeat` + 1
transfers of `--blocks` blocks (scattered over its pool), a consumer in this process pulls them one after the
other through the connector's own path (side-channel handshake, transport, acknowledgement) and prints each
pull's rate; the first pull (connection set-up) is left out of the median. The pool is Llama-3.1-8B's per
layer by default: block 16 tokens x 8 KV heads x 128 dims, bf16 (32 KiB per K or V block), `--layers` 32.
On a CPU machine this is the host-memory path: gloo over loopback TCP vs NIXL's UCX (shared memory / CMA) vs
ipc (the consumer copies from the producer's mapped pool). `copy_GBps` is the best plain copy of the same bytes on
the consumer's device (one contiguous tensor into another: the bound a link on one device can reach), and
`fraction_of_copy` the median pull rate over it. `read_median_s` is the connector's read of the blocks alone (a
one-sided read's copy and wait), `reply_median_s` the wait for the producer's answer on the side channel (its
grant and block ids: a round trip before the read; with `--ids-ahead` the pull names the blocks and the read runs
first, so what is left of the wait comes after it) and `ack_median_s` the acknowledgement's send (after the
pull's event, outside its time); for ipc, `plan_median_s` (the copy plan: index uploads) and `launch_median_s`
(the copy's launch) are parts of the read, or `replay_median_s` where a whole read replays a CUDA graph (the ids'
packing and the replay's launch: kernels/block_copy_graph.py), and `gpu_median_s` the device time of the launch or
replay (CUDA events on the read's stream: what is left of the read is host time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import socket
import statistics
import time

import torch

from meshserve.disagg.config import parse_kv_transfer_config
from meshserve.disagg.connector import HeldTransfer, PullJob


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(ns: argparse.Namespace, role: str, rank: int, port: int):
    extra = {"transfer_timeout_s": 120, "hold_timeout_s": 600}
    if ns.connector == "torch":
        extra["backend"] = _torch_backend(ns)
    return parse_kv_transfer_config(
        {
            "kv_connector": ns.connector,
            "kv_role": role,
            "kv_rank": rank,
            "kv_ip": "127.0.0.1",
            "kv_port": port,
            "kv_connector_extra_config": extra,
        }
    )


def _torch_backend(ns: argparse.Namespace) -> str:
    """NCCL between two GPUs; gloo on CPUs, and for two processes on one GPU (NCCL refuses a duplicate GPU in
    one communicator), staged through host memory."""
    if ns.backend:
        return ns.backend
    two_gpus = ns.device.startswith("cuda") and (ns.producer_device or ns.device) != ns.device
    return "nccl" if two_gpus else "gloo"


def _pool(ns: argparse.Namespace, device: str) -> list[torch.Tensor]:
    shape = (2, ns.pool_blocks, ns.block_size, ns.kv_heads, ns.head_dim)
    return [torch.randn(shape, device=device).to(torch.bfloat16) for _ in range(ns.layers)]


def _connector(ns, role: str, rank: int, port: int, device: str):
    config = _config(ns, role, rank, port)
    pool = _pool(ns, device)
    if ns.connector == "nixl":
        from meshserve.disagg.nixl_connector import make_nixl_connector

        return make_nixl_connector(config, pool)
    if ns.connector == "ipc":
        from meshserve.disagg.ipc_connector import IpcConnector

        return IpcConnector(config, pool)
    from meshserve.disagg.torch_connector import TorchConnector

    return TorchConnector(config, pool)


def _producer(ns: argparse.Namespace, port: int, ready, done) -> None:
    torch.set_num_threads(1)
    conn = _connector(ns, "kv_producer", 0, port, ns.producer_device or ns.device)
    conn.start()
    rng = random.Random(0)
    for i in range(ns.repeat + 1):
        ids = rng.sample(range(ns.pool_blocks), ns.blocks)
        conn.hold(HeldTransfer(f"t{i}", ids, ns.blocks * ns.block_size, 1, time.monotonic() + 600))
    ready.set()
    done.wait(600)
    conn.close()


def copy_rate(nbytes: int, device: str, repeat: int = 10) -> float:
    """GB/s of copying nbytes between two contiguous tensors on device (the best of repeat: the bound)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    rates = []
    for _ in range(repeat + 1):
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        t0 = time.perf_counter()
        dst.copy_(src)
        if src.is_cuda:
            torch.cuda.synchronize(src.device)
        rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
    return max(rates[1:])


def _wait_exit(proc, timeout_s: float) -> None:
    """Waits for the producer's exit by polling, not join(): join waits for its sentinel pipe to close, and a
    torch_shm_manager the producer started (CPU pools shared through the file system: the ipc connector) holds
    that pipe for about a minute after the producer is gone."""
    deadline = time.monotonic() + timeout_s
    while proc.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.02)


class _ReadTimer:
    """Wraps the connector's read methods with timers (the split of a pull the bench reports beside its total)."""

    def __init__(self, conn) -> None:
        self.parts: dict[str, list[float]] = {"reply": [], "read": [], "ack": [], "plan": [], "launch": [],
                                              "replay": []}
        self._events: list[tuple] = []  # (start, end) CUDA events of each launch or replay
        self._wrap(conn, "_reply", "reply")
        self._wrap(conn, "_read_blocks", "read")
        self._wrap(conn, "_send_ack", "ack")
        if hasattr(conn, "_block_copy"):  # ipc: the plan, and the kernel's launch (or graph's replay) where it runs
            self._wrap(conn, "_block_copy", "plan")
            if conn.device.type == "cuda":
                # (block_copy_graph is imported first: it keeps the unwrapped copy_blocks, so no timing event is
                # recorded inside a graph's capture; the replay as a whole is timed instead)
                from meshserve.kernels import block_copy_graph, triton_block_copy

                triton_block_copy.copy_blocks = self._gpu_timed(triton_block_copy.copy_blocks)
                self._wrap(triton_block_copy, "copy_blocks", "launch")
                block_copy_graph.BlockCopyGraphs.__call__ = self._gpu_timed(block_copy_graph.BlockCopyGraphs.__call__)
                self._wrap(block_copy_graph.BlockCopyGraphs, "__call__", "replay")

    def _wrap(self, owner, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.parts[part].append(time.perf_counter() - t0)

        setattr(owner, name, timed)

    def _gpu_timed(self, inner):
        def timed(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                return inner(*args, **kwargs)
            finally:
                end.record()
                self._events.append((start, end))

        return timed

    def medians(self, skip: int) -> dict[str, float]:
        """Each part's median over the timed pulls (the first `skip` calls were the set-up pull's)."""
        out = {f"{k}_median_s": statistics.median(v[skip:]) for k, v in self.parts.items() if v[skip:]}
        if self._events[skip:]:
            torch.cuda.synchronize()
            out["gpu_median_s"] = statistics.median(s.elapsed_time(e) / 1e3 for s, e in self._events[skip:])
        return out


def run(ns: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    port = _free_port()
    ready, done = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_producer, args=(ns, port, ready, done), daemon=True)
    proc.start()
    conn = _connector(ns, "kv_consumer", 1, port, ns.device)
    rates, seconds = [], []
    timer = _ReadTimer(conn)
    try:
        conn.start()
        assert ready.wait(300), "the producer did not start"
        rng, held = random.Random(1), random.Random(0)  # (held: the producer's draw, see _producer)
        for i in range(ns.repeat + 1):
            ids = rng.sample(range(ns.pool_blocks), ns.blocks)
            remote = held.sample(range(ns.pool_blocks), ns.blocks)
            ahead = {"remote_rank": 0, "remote_block_ids": remote} if ns.ids_ahead else {}
            conn.pull(PullJob(f"r{i}", f"t{i}", ids, ns.blocks * ns.block_size, **ahead))
            ev = conn.events.get(timeout=300)
            if ev.kind != "received":
                raise RuntimeError(f"pull {i}: {ev.kind} {ev.reason}")
            if i:  # (the first sets up the connection)
                rates.append(ev.num_bytes / ev.seconds / 1e9)
                seconds.append(ev.seconds)
        nbytes = ev.num_bytes
    finally:
        done.set()
        _wait_exit(proc, 60)
        conn.close()
    return {
        "connector": ns.connector,
        "transport": conn.transport,
        "ids_ahead": ns.ids_ahead,
        "devices": [ns.producer_device or ns.device, ns.device],
        "blocks": ns.blocks,
        "layers": ns.layers,
        "bytes": nbytes,
        "median_s": statistics.median(seconds),
        "median_GBps": statistics.median(rates),
        "best_GBps": max(rates),
        "copy_GBps": (copy := copy_rate(nbytes, ns.device)),
        "fraction_of_copy": statistics.median(rates) / copy,
        **timer.medians(skip=len(timer.parts["read"]) - ns.repeat),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--connector", choices=("torch", "nixl", "ipc"), default="nixl")
    p.add_argument("--blocks", type=int, default=16)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--pool-blocks", type=int, default=64)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cpu", help="the consumer's pool (cpu, cuda, cuda:0)")
    p.add_argument("--producer-device", default="", help="the producer's pool (default: --device), e.g. cuda:1")
    p.add_argument("--backend", choices=("", "nccl", "gloo"), default="",
                   help="the torch connector's (default: nccl between two GPUs, else gloo)")
    p.add_argument("--ids-ahead", action="store_true",
                   help="one-sided connectors: the pull names the producer's blocks (as a prefill's answer does), so "
                        "the read starts beside the grant's round trip")
    p.add_argument("--output", default="", help="write the result's JSON here (NIXL logs to stdout too)")
    ns = p.parse_args(argv)
    result = json.dumps(run(ns))
    print(result)
    if ns.output:
        with open(ns.output, "w") as f:
            f.write(result + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
