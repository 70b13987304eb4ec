"""Event schemas by area; importing this package registers them all."""

from cfs_contracts.events import admin, cluster, data, geo, metadata, ops, repair, tier

__all__ = ["admin", "cluster", "data", "geo", "metadata", "ops", "repair", "tier"]
