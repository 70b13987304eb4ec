"""Key material where it must never be: NKey seeds (`SU...`) and PEM blocks in logs."""

from __future__ import annotations

import re
from pathlib import Path

KEY_MATERIAL = re.compile(r"\bSU[A-Z2-7]{50,}|-----BEGIN")


def key_material_in_logs(base: Path) -> list[str]:
    """Lines that look like an NKey user seed or a PEM block, in every log under `base`
    (the services', the forkserver's, the NATS servers')."""
    found = []
    for path in base.rglob("*.log"):
        for line in path.read_text(errors="replace").splitlines():
            if KEY_MATERIAL.search(line):
                found.append(f"{path.relative_to(base)}: {line[:120]}")
    return found
