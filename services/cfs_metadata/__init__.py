"""metadata-raft: sharded, journaled, fenced POSIX metadata (DESIGN.md §4)."""
