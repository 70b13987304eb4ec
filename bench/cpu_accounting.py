"""CPU accounting shared by the benchmarks: where the cycles of a measured phase went."""

from __future__ import annotations

import os
import resource


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def role_cpu_seconds(roles: dict[str, list[int | None]]) -> dict[str, float]:
    """CPU seconds so far per role; pid None stands for this process."""
    return {
        role: sum(own_cpu_seconds() if pid is None else cpu_seconds(pid) for pid in pids)
        for role, pids in roles.items()
    }


def cpu_us_per_op(
    before: dict[str, float], after: dict[str, float], ops: int, prefix: str
) -> dict[str, float]:
    """Microseconds of CPU each role spent per operation between two snapshots."""
    return {f"{prefix}_{role}": (after[role] - before[role]) / ops * 1e6 for role in before}
