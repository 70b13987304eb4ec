"""chunk-store: erasure-coded fragments on local disk, served over NATS (DESIGN.md §5)."""
