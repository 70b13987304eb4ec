"""Identifiers: ULIDs sort by creation time, which keeps journals readable."""

from __future__ import annotations

from ulid import ULID


def new_id() -> str:
    return str(ULID())
