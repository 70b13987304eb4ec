"""Event schemas by area; importing this package registers them all."""

from cfs_contracts.events import cluster, data, metadata, ops, repair

__all__ = ["cluster", "data", "metadata", "ops", "repair"]
