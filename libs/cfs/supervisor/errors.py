"""Errors raised by the local process supervisor."""

from __future__ import annotations


class SupervisorError(RuntimeError):
    """A supervised process failed to start, become ready, or stop.

    Messages carry the tail of the child's log so a failing fixture explains itself
    without anyone having to dig through temporary directories.
    """
