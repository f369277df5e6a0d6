"""Balancing policies: which healthy replica gets the next attempt of a request.

- least-outstanding (default): the replica with the fewest requests in flight from this router (ties go
  round robin, so an idle pool still spreads).
- prefix-affinity: rendezvous (highest-random-weight) hashing of the prompt's prefix key over the healthy
  replicas, so a prefix sticks to one replica and only the keys of a replica that leaves move; when that
  replica is busier than the least-loaded one by more than `slack`, the least-loaded one serves instead.
- round-robin.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence

from meshserve.router.replica import Replica


class Policy:
    """Picks one of `candidates` (all healthy, none already tried by this request)."""

    name = "base"

    def choose(self, candidates: Sequence[Replica], key: int | None = None) -> Replica:
        raise NotImplementedError


class LeastOutstanding(Policy):
    name = "least-outstanding"

    def __init__(self) -> None:
        self._tie = itertools.count()

    def choose(self, candidates: Sequence[Replica], key: int | None = None) -> Replica:
        least = min(r.outstanding for r in candidates)
        tied = [r for r in candidates if r.outstanding == least]
        return tied[next(self._tie) % len(tied)]


class RoundRobin(Policy):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = itertools.count()

    def choose(self, candidates: Sequence[Replica], key: int | None = None) -> Replica:
        return candidates[next(self._next) % len(candidates)]


def rendezvous_score(key: int, replica_url: str) -> int:
    h = hashlib.blake2b(f"{key}|{replica_url}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big")


class PrefixAffinity(Policy):
    name = "prefix-affinity"

    def __init__(self, slack: int = 4) -> None:
        self.slack = slack
        self._least = LeastOutstanding()
        self.num_affine = 0  # picks that followed the hash
        self.num_spilled = 0  # picks that went least-loaded because the hashed replica was busy

    def owner(self, candidates: Sequence[Replica], key: int) -> Replica:
        return max(candidates, key=lambda r: rendezvous_score(key, r.url))

    def choose(self, candidates: Sequence[Replica], key: int | None = None) -> Replica:
        if key is None:
            return self._least.choose(candidates)
        target = self.owner(candidates, key)
        least = min(r.outstanding for r in candidates)
        if target.outstanding > least + self.slack:
            self.num_spilled += 1
            return self._least.choose(candidates)
        self.num_affine += 1
        return target


def make_policy(name: str, affinity_slack: int = 4) -> Policy:
    if name == "least-outstanding":
        return LeastOutstanding()
    if name == "round-robin":
        return RoundRobin()
    if name == "prefix-affinity":
        return PrefixAffinity(affinity_slack)
    raise ValueError(f"unknown policy {name!r}")
