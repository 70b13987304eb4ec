"""Fault points for recovery tests: `kill -9`, or a bug, at exactly the worst moment.

A test writes a point's name into the file named by `CFS_CRASH_FILE`; the first
process of the site that reaches that point removes the file and exits at once
(`crash_point`: as `kill -9` would, no cleanup, nothing flushed) or raises
`InjectedFault` (`fault_point`: an unexpected exception in a background task).
Without the variable these are no-ops, so production processes never fail here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


class InjectedFault(Exception):
    """The exception `fault_point` raises: a stand-in for any bug."""


_service = ""  # this process's service (`scope`): `point@service` triggers only there


def scope(service: str) -> None:
    global _service
    _service = service


def crash_point(name: str) -> None:
    if _triggered(name):
        log.critical("fault.crash", extra={"point": name})
        os._exit(137)


def fault_point(name: str) -> None:
    if _triggered(name):
        log.critical("fault.raise", extra={"point": name})
        raise InjectedFault(f"fault injected at {name}")


def _triggered(name: str) -> bool:
    """True for exactly one process of the site that reaches the named point."""
    path = os.environ.get("CFS_CRASH_FILE")
    if not path:
        return False
    trigger = Path(path)
    try:
        wanted, _, only = trigger.read_text().strip().partition("@")
    except FileNotFoundError:
        return False
    if wanted != name or (only and only != _service):
        return False
    try:
        trigger.unlink()
    except FileNotFoundError:
        return False  # another process took it
    return True
