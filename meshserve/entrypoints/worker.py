"""Entry for processes that are not rank 0: another node's ranks, or a torchrun rank > 0.

`meshserve generate|serve` with the same flags on every node: rank 0 runs the engine and the command;
every other process only serves its model shard until rank 0 finishes.
"""

from __future__ import annotations

import os

from meshserve.config import EngineArgs


def is_rank_zero(args: EngineArgs) -> bool:
    if args.tensor_parallel_size * args.pipeline_parallel_size == 1:
        return True
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]) == 0
    return args.node_rank == 0


def run_worker_ranks(args: EngineArgs) -> int:
    """Serve this node's ranks (or this torchrun rank) until rank 0 shuts the group down."""
    from meshserve.distributed.launch import launch_info
    from meshserve.engine.engine_config import create_engine_config
    from meshserve.engine.worker import run_node_ranks

    config, source = create_engine_config(args)
    launch = launch_info(config.parallel_config, config.device)
    return run_node_ranks(config, source, launch)
