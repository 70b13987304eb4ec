"""Consistency checks of one shard (STYLE.md #9: ship the checker, run it after tests).

`check_tree` walks the namespace from the root; `check_replay` rebuilds the
state from the journal alone and compares it with the live projection.
"""

from __future__ import annotations

from collections import Counter

from cfs_contracts.fs.records import ROOT_INO, Inode
from cfs_metadata.records import CorruptRecord
from cfs_metadata.state import MemoryShard, ShardView


def check_tree(view: ShardView, inodes: dict[int, Inode] | None = None) -> list[str]:
    """Problems found: dangling entries, wrong link counts, bad parents, orphans.

    `inodes`, when given, is every inode the shard holds (to find orphans).
    """
    problems: list[str] = []
    names: Counter[int] = Counter()
    subdirs: Counter[int] = Counter()
    seen: set[int] = set()
    stack = [ROOT_INO]
    root = _get(view, ROOT_INO, problems)
    if root is None:
        return [*problems, "root directory (inode 1) is missing"]
    while stack:
        parent = stack.pop()
        if parent in seen:
            problems.append(f"directory {parent} is reachable twice (cycle or extra link)")
            continue
        seen.add(parent)
        try:
            entries = list(view.dentries(parent))
        except CorruptRecord as exc:
            problems.append(str(exc))
            continue
        for entry in entries:
            child = _get(view, entry.ino, problems)
            if child is None:
                problems.append(f"dangling entry {parent}/{entry.name} -> inode {entry.ino}")
                continue
            if child.kind is not entry.kind:
                problems.append(
                    f"entry {parent}/{entry.name} says {entry.kind}, inode is {child.kind}"
                )
            names[child.ino] += 1
            if child.is_dir:
                subdirs[parent] += 1
                if child.parent != parent:
                    problems.append(
                        f"Inode {child.ino}: invalid parent pointer "
                        f"({child.parent}, entry is in {parent})"
                    )
                stack.append(child.ino)
            else:
                seen.add(child.ino)
    for ino in seen | set(names):
        inode = view.inode(ino)
        if inode is None:
            continue
        expected = 2 + subdirs[ino] if inode.is_dir else names[ino]
        if inode.nlink != expected:
            problems.append(f"Inode {ino}: link count {inode.nlink}, expected {expected}")
    for ino in sorted(set(inodes or ()) - seen):
        problems.append(f"Inode {ino}: orphan (no directory entry reaches it)")
    return problems


def check_replay(live: MemoryShard, replayed: MemoryShard) -> list[str]:
    """Differences between the live state and one rebuilt from the journal."""
    problems = []
    for ino in sorted(set(live.inodes) | set(replayed.inodes)):
        if live.inodes.get(ino) != replayed.inodes.get(ino):
            problems.append(f"Inode {ino}: live state differs from journal replay")
    for parent in sorted(set(live.dirs) | set(replayed.dirs)):
        if live.dirs.get(parent) != replayed.dirs.get(parent):
            problems.append(f"directory {parent}: entries differ from journal replay")
    return problems


def _get(view: ShardView, ino: int, problems: list[str]) -> Inode | None:
    try:
        return view.inode(ino)
    except CorruptRecord as exc:
        problems.append(str(exc))
        return None
