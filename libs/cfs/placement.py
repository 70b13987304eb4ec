"""Where a chunk's fragments go: rendezvous hashing over failure domains (DESIGN.md §5).

Every client computes the same order for a chunk from the same node set, with
no coordination, and adding or removing a node moves only the fragments whose
top choices changed. The chosen nodes are recorded in the chunk map, so reads
never depend on this order again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Candidate:
    node: str
    domain: str = ""
    free_bytes: int = 0
    labels: dict[str, str] = field(default_factory=dict)


def score(node: str, key: str) -> int:
    digest = hashlib.blake2b(f"{node}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest)


def rank(key: str, candidates: Iterable[Candidate]) -> list[Candidate]:
    """Every candidate, best first, interleaving failure domains.

    Round robin over domains (each domain's nodes in rendezvous order, domains
    ordered by their best node), so the first n picks touch as many distinct
    domains as exist before any domain gets a second fragment.
    """
    by_domain: dict[str, list[Candidate]] = {}
    for cand in sorted(candidates, key=lambda c: score(c.node, key), reverse=True):
        by_domain.setdefault(cand.domain or cand.node, []).append(cand)
    queues = list(by_domain.values())
    ordered: list[Candidate] = []
    while queues:
        ordered.extend(q.pop(0) for q in queues)
        queues = [q for q in queues if q]
    return ordered


def place(key: str, candidates: Iterable[Candidate], count: int) -> list[str]:
    """The first `count` nodes for `key`; fewer candidates than `count` is an error."""
    ranked = rank(key, candidates)
    if len(ranked) < count:
        raise ValueError(f"placement needs {count} nodes, only {len(ranked)} eligible")
    return [c.node for c in ranked[:count]]
