"""Client library: metadata operations and the data path (file contents)."""

from cfs.client.chunks import ChunkStoreClient, FragmentError
from cfs.client.files import FileStore, OpenFile
from cfs.client.metadata import LeaderUnavailable, MetadataClient

__all__ = [
    "ChunkStoreClient",
    "FileStore",
    "FragmentError",
    "LeaderUnavailable",
    "MetadataClient",
    "OpenFile",
]
