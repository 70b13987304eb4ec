"""Admin commands (`cfs admin`): pure decisions, snapshots, the command executor."""
