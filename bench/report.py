"""What every benchmark ends with: its goals, one line each, and its figures as JSON."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


def print_goals(goals: Mapping[str, bool]) -> None:
    for goal, met in goals.items():
        print(f"goal {goal}: {'met' if met else 'NOT met'}")


def write_json(path: Path | None, results: Mapping[str, object]) -> None:
    """The figures to `path` (`--json`), if one was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
