"""free_port: a port handed out by one process is not handed out by another while its
server has not bound it yet (the in-process memory alone let two test workers share
one)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cfs.supervisor import ports


def test_another_process_does_not_get_a_port_claimed_here(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ports.random, "randrange", random.Random(7).randrange)
    first = ports.free_ports(20)
    # Another process: same choices, none of this process's memory.
    monkeypatch.setattr(ports, "_issued", set())
    monkeypatch.setattr(ports.random, "randrange", random.Random(7).randrange)
    second = ports.free_ports(20)
    assert not set(first) & set(second)


def test_a_stale_claim_is_taken_over(monkeypatch: pytest.MonkeyPatch) -> None:
    port = ports.free_port()
    assert not ports._claim(port)
    monkeypatch.setattr(ports, "CLAIM_S", 0.0)
    assert ports._claim(port)


def test_without_a_usable_claims_directory_ports_still_come(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(ports.tempfile, "gettempdir", lambda: str(tmp_path / "missing" / "x"))
    assert ports._claims_dir() is None
    assert ports.free_port() > 0
