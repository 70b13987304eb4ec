"""The `cfs` command line."""
