"""Balancing policies and prefix keys, on plain Replica objects (no network)."""

from __future__ import annotations

import collections

import pytest

from meshserve.router.config import RouterConfig
from meshserve.router.policy import LeastOutstanding, PrefixAffinity, RoundRobin
from meshserve.router.pool import ReplicaPool
from meshserve.router.prefix import prefix_key
from meshserve.router.replica import Replica


def replicas(n: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000", healthy=True, name=f"r{i}") for i in range(n)]


def test_least_outstanding_picks_the_idlest_and_spreads_ties():
    rs = replicas(3)
    rs[0].outstanding, rs[1].outstanding, rs[2].outstanding = 5, 1, 3
    policy = LeastOutstanding()
    assert policy.choose(rs).name == "r1"
    for r in rs:
        r.outstanding = 0
    picks = collections.Counter(policy.choose(rs).name for _ in range(30))
    assert picks == {"r0": 10, "r1": 10, "r2": 10}


def test_round_robin_cycles():
    rs = replicas(3)
    policy = RoundRobin()
    assert [policy.choose(rs).name for _ in range(6)] == ["r0", "r1", "r2", "r0", "r1", "r2"]


def test_prefix_keys_share_leading_blocks_only():
    system = "You are a careful assistant. " * 12  # > 256 chars: the key covers 4 whole blocks of 64
    assert len(system) > 256
    a = prefix_key({"prompt": system + "question one"})
    b = prefix_key({"prompt": system + "a different question"})
    c = prefix_key({"prompt": "Something else entirely. " * 12})
    assert a == b != c
    # token-id prompts: 4 blocks of 16 ids decide; a partial last block is ignored
    ids = list(range(100, 170))
    assert prefix_key({"prompt": ids}) == prefix_key({"prompt": ids[:64] + [1, 2, 3]})
    assert prefix_key({"prompt": ids[:40]}) == prefix_key({"prompt": ids[:32] + [9] * 8})
    assert prefix_key({"prompt": ids[:40]}) != prefix_key({"prompt": [7] + ids[1:40]})
    # chat: messages in order; a shared system prompt shares the key
    sys_msg = {"role": "system", "content": system}
    assert prefix_key({"messages": [sys_msg, {"role": "user", "content": "hi"}]}) == \
        prefix_key({"messages": [sys_msg, {"role": "user", "content": "bye"}]})
    assert prefix_key({"messages": []}) is None
    assert prefix_key({"prompt": ""}) is None
    assert prefix_key(None) is None
    # a short prompt (less than one block) is keyed by all of it
    assert prefix_key({"prompt": "short"}) != prefix_key({"prompt": "shorT"})


def test_prefix_affinity_is_sticky_consistent_and_spills_when_busy():
    rs = replicas(4)
    policy = PrefixAffinity(slack=2)
    keys = [prefix_key({"prompt": f"document {i:03d} " * 30}) for i in range(200)]
    owners = {k: policy.choose(rs, k).name for k in keys}
    assert all(policy.choose(rs, k).name == owners[k] for k in keys)  # sticky
    assert len(set(owners.values())) == 4  # and spread over every replica
    # removing one replica moves only its keys (rendezvous hashing)
    survivors = [r for r in rs if r.name != "r2"]
    moved = [k for k in keys if policy.choose(survivors, k).name != owners[k]]
    assert moved and all(owners[k] == "r2" for k in moved)
    # a busy owner (beyond least-loaded + slack) spills to the least-loaded replica
    k = keys[0]
    owner = next(r for r in rs if r.name == owners[k])
    owner.outstanding = 3
    assert policy.choose(rs, k) is not owner  # 3 > 0 + 2: spill to an idle replica
    for r in rs:
        r.outstanding = 1 if r is not owner else 3
    assert policy.choose(rs, k) is owner  # 3 <= 1 + 2: still affine
    owner.outstanding = 4
    assert policy.choose(rs, k) is not owner
    assert policy.num_spilled >= 1


def test_pool_routes_to_fallback_when_primaries_are_down_or_queue_is_deep():
    config = RouterConfig(backends=["http://a:1", "http://b:1"], fallbacks=["http://f:1"],
                          fallback_queue_threshold=4, target_queue_per_replica=3)
    pool = ReplicaPool(config)
    for r in pool.all():
        r.healthy = True
    assert pool.route(None).fallback_reason is None
    pool.primaries[0].outstanding = 2
    pool.primaries[1].outstanding = 2
    assert pool.desired_replicas() == 2  # ceil(4 / 3)
    route = pool.route(None)
    assert route.replica.pool == "fallback" and route.fallback_reason == "queue_depth"
    pool.primaries[0].outstanding = pool.primaries[1].outstanding = 0
    assert pool.desired_replicas() == 1
    pool.primaries[0].eject("test")
    assert pool.route(None).replica.name == "primary-1"
    assert pool.route(None, tried={"http://b:1"}).fallback_reason == "primaries_unavailable"
    pool.primaries[1].eject("test")
    assert pool.route(None).fallback_reason == "primaries_unavailable"
    pool.fallbacks[0].eject("test")
    assert pool.route(None) is None


@pytest.mark.parametrize("bad", [{"backends": []}, {"backends": ["10.0.0.1:8000"]},
                                 {"backends": ["http://a:1"], "policy": "random"},
                                 {"backends": ["http://a:1"], "max_attempts": 0}])
def test_config_validation(bad):
    from meshserve.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        RouterConfig(**bad).validate()
