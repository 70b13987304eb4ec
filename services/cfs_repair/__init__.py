"""repair: re-protects the fragments of lost, removed or draining nodes (DESIGN.md §6)."""
