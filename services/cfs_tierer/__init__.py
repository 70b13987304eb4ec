"""s3-tierer: the object-store tier of DESIGN.md §7 (issue 15)."""
