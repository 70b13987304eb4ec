"""The backup service (DESIGN.md §9): consistent metadata snapshots; one active per site."""
