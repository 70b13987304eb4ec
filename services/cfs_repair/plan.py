"""What to rebuild for one chunk, and where: pure (DESIGN.md §2).

Targets are chosen by rendezvous rank over the eligible nodes, preferring
nodes that hold no fragment of the chunk yet, so a coordinator that resumes
after a crash picks the same targets again and a fragment is never rebuilt
into two places. With fewer eligible nodes than fragments (a 6-node 4+2 site
that lost a node), a fragment doubles up on a holder rather than staying
unprotected: k+m fragments on live nodes, as the operator expects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from cfs.erasure import Scheme
from cfs.placement import Candidate, rank
from cfs_contracts.data import fragment_key
from cfs_contracts.fs.records import ChunkRef


class Reason(StrEnum):
    DOWN = "down"
    REMOVED = "removed"
    DRAINING = "draining"


@dataclass(frozen=True)
class ChunkPlan:
    ino: int
    ref: ChunkRef
    scheme: Scheme
    missing: tuple[int, ...]  # fragment indices to re-create
    sources: tuple[int, ...]  # healthy fragment indices, data fragments first
    targets: dict[int, str] = field(default_factory=dict)  # fragment index -> new node
    copyable: bool = False  # the old holder still answers (drain): copy, do not decode

    @property
    def lost(self) -> bool:
        return len(self.sources) < self.scheme.k and not self.copyable

    def key(self, fragment: int) -> str:
        return fragment_key(self.ref.chunk_id, self.ref.scheme, fragment)


def plan_chunk(
    ino: int,
    ref: ChunkRef,
    leaving: str,
    candidates: Sequence[Candidate],
    *,
    unusable: Iterable[str] = (),
    copyable: bool = False,
) -> ChunkPlan | None:
    """Re-home every fragment of `ref` held by `leaving`; None if it holds none.

    `unusable`: other nodes known to be down (their fragments are not sources).
    """
    scheme = Scheme.parse(ref.scheme)
    bad = {leaving, *unusable}
    missing = tuple(i for i, node in enumerate(ref.fragments) if node == leaving)
    if not missing:
        return None
    sources = tuple(i for i, node in enumerate(ref.fragments) if node not in bad)
    holders = {node for node in ref.fragments if node not in bad}
    ranked = [c.node for c in rank(ref.chunk_id, candidates) if c.node not in bad]
    fresh = [n for n in ranked if n not in holders]
    doubled = [n for n in ranked if n in holders]
    order = fresh + doubled
    targets = {fragment: order[i] for i, fragment in enumerate(missing) if i < len(order)}
    return ChunkPlan(
        ino=ino,
        ref=ref,
        scheme=scheme,
        missing=missing,
        sources=sources,
        targets=targets,
        copyable=copyable,
    )
