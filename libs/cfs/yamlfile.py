"""YAML files read into pydantic models, with one-line errors (topologies, alert rules)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def load_yaml_model(path: Path, model: type[M], what: str, error: type[Exception]) -> M:
    """`path` parsed into `model`; any problem is one `error`: `<what> <path>: <where>:
    <why>` (an empty file is an empty mapping)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise error(f"{what} {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{what} {path}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        raise error(f"{what} {path}: not valid YAML: nested too deeply") from None
    except ValueError as exc:  # a constructor's: an integer of more digits than int() takes
        raise error(f"{what} {path}: not valid YAML: {' '.join(str(exc).split())}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        why = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise error(f"{what} {path}: not valid YAML{at}: {why}") from None
    try:
        return model.model_validate(data if data is not None else {})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(_shown(part) for part in first["loc"]) or "file"
        raise error(f"{what} {path}: {where}: {' '.join(first['msg'].split())}") from None


def _shown(part: object) -> str:
    """A key as written when it is plain, else quoted (a key may hold a newline)."""
    text = str(part)
    return text if text and text.isprintable() and " " not in text else repr(text)
