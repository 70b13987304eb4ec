"""`cfs admin dr-drill`: the operator guide's monthly DR drill in one command.

`plan` decides (steps, dependencies, what runs after a failure, the report);
`sample` and `smoke` are the checks; `runner` acts (the live site, a temporary local
site, a FUSE mount) and always tears down what it started.
"""
