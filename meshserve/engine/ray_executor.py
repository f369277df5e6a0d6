"""Ranks placed on an existing Ray cluster: a placement group with one bundle per rank, one actor per rank.

Rank 0 (the scheduler's) stays in the driver process, as with the multiprocess executor; the actors run
the same worker loop, joining the torch.distributed world at the driver's address. Ray is an optional
extra: `pip install meshserve[ray]`.
"""

from __future__ import annotations

import logging

from meshserve.engine.multiproc_executor import MultiprocExecutor
from meshserve.engine.worker import init_rank, serve_rank
from meshserve.errors import InvalidArgumentError

logger = logging.getLogger(__name__)


class RankActor:
    """Holds one worker rank; `run` returns when rank 0 shuts the group down."""

    def run(self, config, source, launch, rank: int) -> int:
        runner = init_rank(config, source, launch, rank)
        serve_rank(runner, rank)
        return 0


class RayExecutor(MultiprocExecutor):
    """The multiprocess executor with its worker ranks as Ray actors in one placement group (rank 0 stays
    in this process). Holds the placement group and the actors; same promises as MultiprocExecutor."""

    def _start_workers(self, config, source, launch, worker_main) -> None:
        try:
            import ray
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        except ImportError as e:
            raise InvalidArgumentError("distributed_executor_backend ray needs Ray: pip install meshserve[ray]",
                                       param="distributed_executor_backend") from e
        if not ray.is_initialized():
            ray.init(address="auto" if _cluster_running() else None, ignore_reinit_error=True,
                     log_to_driver=False)
        launch.master_addr = ray.util.get_node_ip_address()
        use_gpu = config.device.startswith("cuda")
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": 1}
        self.pg = placement_group([bundle] * launch.world_size, strategy="PACK")
        ray.get(self.pg.ready(), timeout=120)
        actor_cls = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0)(RankActor)
        self.actors, self.refs = {}, {}
        for rank in range(1, launch.world_size):
            actor = actor_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=rank)).remote()
            self.actors[rank] = actor
            self.refs[rank] = actor.run.remote(config, source, launch, rank)
        self._ray = ray

    def _exit_codes(self) -> dict[int, int | None]:
        codes: dict[int, int | None] = {}
        for rank, ref in self.refs.items():
            ready, _ = self._ray.wait([ref], timeout=0)
            if not ready:
                codes[rank] = None
                continue
            try:
                codes[rank] = self._ray.get(ref)
            except Exception:  # noqa: BLE001  (the actor died or raised)
                codes[rank] = 1
        return codes

    def _stop_workers(self) -> None:
        ray = self._ray
        ray.wait(list(self.refs.values()), num_returns=len(self.refs), timeout=10)
        for actor in self.actors.values():
            ray.kill(actor)
        ray.util.remove_placement_group(self.pg)


def _cluster_running() -> bool:
    import os

    return bool(os.environ.get("RAY_ADDRESS"))
