"""Event schemas by area; importing this package registers them all."""

from cfs_contracts.events import cluster, metadata, ops

__all__ = ["cluster", "metadata", "ops"]
