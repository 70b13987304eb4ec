"""Generate the AsyncAPI document of every current event from the contracts.

    python -m cfs_contracts.asyncapi --output contracts/cfs_contracts/asyncapi.json

FastStream builds the document from publishers whose message schema is the
typed envelope of each event; nothing here connects to a server.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI

from cfs_contracts import REGISTRY, Registry


def build(registry: Registry = REGISTRY) -> dict[str, Any]:
    broker = NatsBroker()
    current = [s for s in registry.specs() if s.version == registry.current_version(s.type)]
    for spec in current:
        older = [f"v{s.version}" for s in registry.specs() if s.type == spec.type and s is not spec]
        note = f" Older versions, upcast on read: {', '.join(older)}." if older else ""
        broker.publisher(
            spec.subject_template.replace("{", "<").replace("}", ">"),
            title=f"{spec.type}:v{spec.version}",
            description=f"stream {spec.stream}; schema v{spec.version}.{note}",
            schema=spec.typed_envelope(),
        )
    doc = AsyncAPI(
        broker,
        title="ClaudeFS events",
        version="1",
        description="Every event ClaudeFS services publish to NATS JetStream (DESIGN.md §3).",
        schema_version="3.0.0",
    )
    result: dict[str, Any] = json.loads(doc.to_specification().to_json())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    args.output.write_text(json.dumps(build(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
