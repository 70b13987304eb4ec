"""Quorum-loss recovery: copy a site's streams off a survivor and re-seed a fresh cluster.

`streams` holds the building blocks (export by direct get, ordered import, scale
back to R3); `plan` says what a recovery must do, step by step with reasons (pure);
`natsconf` writes the operator's nats-server configs (pure); `runners` perform the
server steps (the dev supervisor, the operator, Nomad); `quorum` walks a plan and
`drive` gathers the facts for `cfs admin raft-force-leader`.
"""

from cfs.recovery.streams import (
    ExportedStream,
    ImportedStream,
    ImportReport,
    RecoveryError,
    export_streams,
    import_streams,
    scale_streams,
)

__all__ = [
    "ExportedStream",
    "ImportReport",
    "ImportedStream",
    "RecoveryError",
    "export_streams",
    "import_streams",
    "scale_streams",
]
