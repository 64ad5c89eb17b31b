"""``[mesh] shard = K/N``: which of N collector machines collects a host.

Every machine reads the same meshes and keeps the hosts whose shard is its K.
A host's shard is the k in 1..N with the highest weight ``sha256(host, k)``
(rendezvous, or highest-random-weight, hashing): the canonical host name and
nothing of the machine goes in, so N machines with the same configuration
split the host set alike, each on its own, with no coordinator.

Why rendezvous and not ``hash(host) % N`` (Prometheus' ``hashmod``): with a
modulo, going from N to N+1 machines changes the shard of about N/(N+1) of
the hosts, and every moved host starts on its new machine from ``[collect]
first_run_lookback``, sending that again.  Here a host's weights for shards
1..N do not depend on N, so going to N+1 moves a host only when its weight for
the new shard beats all the others: about 1/(N+1) of the hosts, all to the new
shard; going back moves only that shard's hosts.  A consistent-hash ring would
move as few, but needs virtual nodes to be even; this is even as it stands.

The weight hashes (host, k), not the host alone, so it is independent of the
host's timer phase (``units.phase``, a hash of the name): each machine's hosts
still spread evenly over the collect interval.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


def weight(host: str, k: int) -> int:
    """The stable weight of shard ``k`` for canonical ``host`` (64 bits of SHA-256)."""
    digest = hashlib.sha256(f"{host}\0{k}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def owner(host: str, n: int) -> int:
    """The shard (1..n) that collects ``host``: the one of highest weight."""
    return max(range(1, n + 1), key=lambda k: weight(host, k))


def assign(hosts: Iterable[str], n: int) -> dict[str, int]:
    """Host -> its shard, for every host of ``hosts``."""
    return {h: owner(h, n) for h in hosts}


@dataclass(frozen=True)
class Split:
    """This machine's shard ``k`` of ``n`` and how many hosts each shard has."""

    k: int
    n: int
    counts: tuple[int, ...]  # hosts of shard 1..n

    @classmethod
    def of(cls, owners: dict[str, int], k: int, n: int) -> Split:
        counts = [0] * n
        for s in owners.values():
            counts[s - 1] += 1
        return cls(k, n, tuple(counts))

    @property
    def here(self) -> int:
        return self.counts[self.k - 1]

    @property
    def total(self) -> int:
        return sum(self.counts)

    def line(self) -> str:
        """``shard 2/3: 667 of 2000 hosts here (1: 664, 2: 667, 3: 669)``."""
        each = ", ".join(f"{i}: {c}" for i, c in enumerate(self.counts, 1))
        return f"shard {self.k}/{self.n}: {self.here} of {self.total} hosts here ({each})"

    def record(self) -> dict[str, Any]:
        """What ``sync.json`` keeps of it (``shard``), read back by :meth:`from_record`."""
        return {"k": self.k, "n": self.n, "counts": list(self.counts)}

    @classmethod
    def from_record(cls, rec: Any) -> Split | None:
        """The split a ``sync.json`` recorded; None when it has none (or a damaged one)."""
        try:
            k, n, counts = int(rec["k"]), int(rec["n"]), tuple(int(c) for c in rec["counts"])
        except (TypeError, KeyError, ValueError):
            return None
        return cls(k, n, counts) if 1 <= k <= n == len(counts) else None
