"""capture_graph's TP vote over real gloo ranks: whether a graph captured without its warm-up run stands is agreed
by every rank of the TP group (a MIN), so all of them take the warm-up path together or none does."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from meshserve.distributed import process_start
from meshserve.distributed.launch import free_port
from tests.ranks import run_ranks


def _run(rank: int, port: int, results) -> None:
    from meshserve.engine import cuda_graph

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        state = dataclasses.replace(cuda_graph.get_parallel_state(), tp_size=2, tp_rank=rank,
                                    tp_group=dist.group.WORLD)
        cuda_graph.get_parallel_state = lambda: state
        # per graph: did this rank capture it without a build? rank 1 refused a build in the second graph
        votes = [cuda_graph._on_every_tp_rank(ok, torch.device("cpu"))
                 for ok in ([True, True, False] if rank == 0 else [True, False, False])]
        results.put((rank, votes))
    finally:
        dist.destroy_process_group()


def test_every_rank_keeps_a_graph_only_if_every_rank_captured_it():
    results = process_start.context().Queue()
    port = free_port()
    assert run_ranks(_run, lambda rank: (rank, port, results)) == [0, 0]
    got = dict(results.get(timeout=5) for _ in range(2))
    assert got == {0: [True, False, False], 1: [True, False, False]}
