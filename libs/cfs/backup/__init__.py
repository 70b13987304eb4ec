"""Shared by the backup service and the `cfs admin` backup commands: the shard image
format and the snapshot file (DESIGN.md §9)."""
