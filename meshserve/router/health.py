"""Active health checks: probe every replica's /ready on an interval, with fail/recover thresholds.

A probe that times out or cannot connect counts as a failure, like a 503 from /ready; `fail_threshold`
consecutive failures eject a healthy replica, `recover_threshold` consecutive successes re-admit an
ejected one. The passive path (a request seeing a replica fail) ejects at once from the proxy; these
probes are what bring such a replica back. Each good probe also scrapes the replica's waiting queue.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

from meshserve.router.config import RouterConfig
from meshserve.router.discovery import resolve
from meshserve.router.pool import ReplicaPool
from meshserve.router.replica import PRIMARY, Replica

logger = logging.getLogger(__name__)

# vLLM's gauge (one series per engine: summed), which a meshserve or a vLLM replica exports; a replica of an
# older meshserve exported it unlabelled as meshserve:num_requests_waiting
_WAITING = ("vllm:num_requests_waiting", "meshserve:num_requests_waiting")


def parse_num_waiting(text: str) -> int | None:
    totals: dict[str, float] = {}
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in _WAITING:
            try:
                totals[name] = totals.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
            except ValueError:
                return None
    for name in _WAITING:
        if name in totals:
            return int(totals[name])
    return None


class HealthChecker:
    """Runs the probe loop (and DNS discovery) as one background task."""

    def __init__(self, pool: ReplicaPool, config: RouterConfig, client: httpx.AsyncClient):
        self.pool = pool
        self.config = config
        self.client = client
        self.num_rounds = 0
        self._task: asyncio.Task | None = None

    async def probe(self, replica: Replica) -> bool:
        timeout = httpx.Timeout(self.config.health_timeout_s)
        try:
            resp = await self.client.get(replica.url + "/ready", timeout=timeout)
        except httpx.TimeoutException:
            replica.probe_failed("health check timed out", self.config.fail_threshold)
            return False
        except httpx.HTTPError as e:
            replica.probe_failed(f"health check failed: {type(e).__name__}", self.config.fail_threshold)
            return False
        if resp.status_code != 200:
            replica.probe_failed(f"/ready answered {resp.status_code}", self.config.fail_threshold)
            return False
        replica.probe_succeeded(self.config.recover_threshold)
        if replica.pool == PRIMARY:
            await self._scrape_waiting(replica, timeout)
        return True

    async def _scrape_waiting(self, replica: Replica, timeout: httpx.Timeout) -> None:
        try:
            resp = await self.client.get(replica.url + "/metrics", timeout=timeout)
            waiting = parse_num_waiting(resp.text) if resp.status_code == 200 else None
        except httpx.HTTPError:
            waiting = None  # the /ready probe decides health; a missed scrape only ages the figure
        if waiting is not None:
            replica.num_waiting = waiting

    async def check_all(self) -> None:
        if self.config.discover:
            found: list[str] = []
            for target in self.config.discover:
                found += await resolve(target)
            self.pool.sync_primaries(found, static=self.config.backends)
        await asyncio.gather(*(self.probe(r) for r in self.pool.all()))
        self.num_rounds += 1

    async def run(self) -> None:
        while True:
            try:
                await self.check_all()
            except Exception:
                logger.exception("health check round failed")
            await asyncio.sleep(self.config.health_interval_s)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run(), name="router-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
