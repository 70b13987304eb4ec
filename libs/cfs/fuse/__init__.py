"""FUSE mount of ClaudeFS (pyfuse3 on asyncio): `cfs mount` or `python -m cfs.fuse`.

`operations` holds the request handlers, `mount` runs them (see its docstring).
"""
