"""What a merge of two sites' versions found (DESIGN.md §8): the record both sites
keep of a change made on each without either seeing the other's, with both values,
their stamps and the site whose value stayed."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cfs_contracts.fs.records import Stamp

ConflictKind = Literal["field", "name", "deleted"]


class FieldConflict(BaseModel):
    """`field`: one group of an inode's fields (`FIELD_GROUPS`) changed on both sites.
    `name`: one name bound to two different files; the loser's file stays, under
    `kept_as` in the same directory. `deleted`: a file or directory deleted on one site
    and changed on the other (or, a directory, added to): the deletion loses, the
    file stays under its names (`kept_as`: the first)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: ConflictKind = "field"
    ino: int = Field(description="the inode (name: the winner's)")
    group: str = Field(description="field group, or the name that was bound twice")
    local: dict[str, Any]
    remote: dict[str, Any]
    local_stamp: Stamp | None = None
    remote_stamp: Stamp | None = None
    here: str = Field(description="the site that merged")
    there: str = Field(description="the site whose version arrived")
    winner: str = Field(description="the site whose value stays")
    parent: int = Field(default=0, description="name: the directory")
    kept_as: str | None = Field(default=None, description="name: where the loser's file is")

    @property
    def conflict_id(self) -> str:
        """The same on both sites for the same two changes: `<ino>-<kind>-<hash>`."""
        stamps = sorted(
            f"{s.ns}:{s.site}" for s in (self.local_stamp, self.remote_stamp) if s is not None
        )
        what = "|".join([self.group, str(self.parent), *stamps])
        digest = hashlib.blake2b(what.encode("utf-8", "surrogateescape"), digest_size=6)
        return f"{self.ino}-{self.kind}-{digest.hexdigest()}"

    @property
    def scope(self) -> tuple[int, str, str, int]:
        """What one divergence is about: both sites may record it as several pairs of
        changes (ids), one line of `show-conflicts` and one resolution cover them all."""
        return (self.ino, self.kind, self.group, self.parent)

    @property
    def last_ns(self) -> int:
        """When the later of its two changes was made."""
        return max((s.ns for s in (self.local_stamp, self.remote_stamp) if s), default=0)

    @property
    def reason(self) -> str:
        if self.kind == "name":
            return f"name {self.group!r} bound on both sites; {self.winner} wrote last"
        if self.kind == "deleted":
            return f"deleted on one site, changed on {self.winner}: kept"
        return f"{self.group} changed on both sites; {self.winner} wrote last"
