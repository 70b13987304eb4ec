"""Formats the s3-tierer persists in the bucket (DESIGN.md §7).

Chunks are packed into blobs of about 64 MiB. Each blob ends with its own index,
so the bucket alone is enough to find every chunk after the loss of everything
else (scenario 8); a blob outlives the release that wrote it, hence the format
number in its footer.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

BLOB_FORMAT = 1
BLOB_TARGET_BYTES = 64 * 1024 * 1024


class BlobEntry(BaseModel):
    """Where one chunk's bytes are in a blob, and their SHA-256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    chunk_id: str = Field(min_length=1, max_length=255)
    offset: int = Field(ge=0, description="of the chunk's data within the blob")
    length: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class BlobIndex(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    blob_id: str = Field(min_length=1)
    format: int = BLOB_FORMAT
    entries: tuple[BlobEntry, ...]
