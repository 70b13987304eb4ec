"""Client library: metadata operations (and, later, the data path)."""

from cfs.client.metadata import LeaderUnavailable, MetadataClient

__all__ = ["LeaderUnavailable", "MetadataClient"]
