"""`python -m cfs.fuse MOUNTPOINT [--cluster URLS] [--site NAME] [--shards N]` (foreground)."""

from cfs.fuse.mount import main

main()
