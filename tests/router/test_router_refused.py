"""A refused connection costs a request none of its attempts: it reached no replica (issue 19).

When every primary dies at once the router still believes them healthy until a request or a probe finds
out; a request that spent its attempts on them got a 503 although the fallback was up.
"""

from __future__ import annotations

import httpx

from meshserve.router.config import RouterConfig
from tests.router.test_router_proxy import QUIET, replica_state


def test_dead_primaries_cost_no_attempts_and_the_fallback_serves(fake_replicas, router):
    primaries = [fake_replicas(f"p{i}")[1] for i in range(3)]
    _, fb = fake_replicas("fb")
    r = router(RouterConfig(backends=[p.base_url for p in primaries], fallbacks=[fb.base_url],
                            max_attempts=2, **QUIET))
    assert all(replica_state(r, f"primary-{i}")["healthy"] for i in range(3))
    for p in primaries:
        p.stop()  # the router still believes them healthy: only the request can find out
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "from fb"
    assert resp.headers["x-meshserve-fallback"] == "primaries_unavailable"
    assert resp.headers["x-meshserve-attempts"] == "4"  # three refused, then the fallback
    assert not any(replica_state(r, f"primary-{i}")["healthy"] for i in range(3))


def test_attempts_that_reach_a_replica_still_count(fake_replicas, router):
    _, dead = fake_replicas("dead")
    busy = [fake_replicas(f"busy{i}", mode="status", status=429) for i in range(2)]
    r = router(RouterConfig(backends=[dead.base_url, *(b.base_url for _, b in busy)], max_attempts=1,
                            **QUIET))
    dead.stop()
    resp = httpx.post(r.base_url + "/v1/completions", json={"model": "tiny", "prompt": "x"})
    assert resp.status_code == 429
    assert sum(len(script.requests) for script, _ in busy) == 1  # one attempt reached a replica, then stop
