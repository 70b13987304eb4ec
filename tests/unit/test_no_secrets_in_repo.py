"""No key material is committed: no NKey seed, no private key (DESIGN.md §10)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# An NKey seed of any type (user SU, account SA, operator SO, server SN...) or a PEM
# private key. The pattern is assembled so this file does not match itself.
SECRET = re.compile(r"\bS[UAONC][A-Z2-7]{56}\b|-----BEGIN [A-Z ]*PRIVATE" + r" KEY-----")


def test_the_repository_holds_no_key_material() -> None:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    leaks = []
    for name in listed.decode().split("\0"):
        path = ROOT / name
        if not name or not path.is_file():
            continue
        text = path.read_bytes()[:2_000_000].decode(errors="replace")
        leaks += [f"{name}: {m.group(0)[:12]}..." for m in SECRET.finditer(text)]
    assert leaks == []
