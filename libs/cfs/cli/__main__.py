"""`python -m cfs.cli ...` is the `cfs` command (for children started with sys.executable)."""

from cfs.cli.main import main

main()
