"""Crash points for recovery tests: `kill -9` at exactly the worst moment.

A test writes a point's name into the file named by `CFS_CRASH_FILE`; the first
process of the site that reaches that point removes the file and exits at once
(as `kill -9` would: no cleanup, nothing flushed). Without the variable this
is a no-op, so production processes never crash here.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def crash_point(name: str) -> None:
    path = os.environ.get("CFS_CRASH_FILE")
    if not path:
        return
    trigger = Path(path)
    try:
        wanted = trigger.read_text().strip()
    except FileNotFoundError:
        return
    if wanted != name:
        return
    try:
        trigger.unlink()
    except FileNotFoundError:
        return  # another process took this crash
    log.critical("fault.crash", extra={"point": name})
    os._exit(137)
