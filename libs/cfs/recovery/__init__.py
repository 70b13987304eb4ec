"""Quorum-loss recovery: copy a site's streams off a survivor and re-seed a fresh cluster.

`streams` holds the building blocks (export by direct get, ordered import, scale
back to R3); `quorum` drives them for `cfs admin raft-force-leader`.
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
