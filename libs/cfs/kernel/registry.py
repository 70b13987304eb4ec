"""Every service this release can run, from the packages' own declarations.

A service package has a `spec` module exporting `SPEC` and announces it with an entry
point in the `claudefs.services` group (Python's plugin mechanism, so a service shipped
as its own distribution is found the same way). Nothing else lists services: adding
`services/cfs_backup/spec.py` and its entry point makes `cfs service run backup`, the
dev supervisor's processes, the `backup` role's NATS permissions and the deployment
checks all know it (a test fails when a `services/cfs_*` package is not announced).
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from cfs.kernel.spec import ServiceSpec

ENTRY_POINT_GROUP = "claudefs.services"


class UnknownService(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name

    def __str__(self) -> str:
        return f"unknown service {self.name!r}; known: {', '.join(service_names())}"


@functools.cache
def specs() -> tuple[ServiceSpec, ...]:
    """Every service's spec, sorted by name; names and roles are unique (checked)."""
    found: list[ServiceSpec] = []
    for point in entry_points(group=ENTRY_POINT_GROUP):
        spec = point.load()
        if not isinstance(spec, ServiceSpec):
            raise TypeError(f"entry point {point.value} is not a ServiceSpec")
        if spec.name != point.name:
            raise ValueError(f"entry point {point.name!r} names service {spec.name!r}")
        found.append(spec)
    found.sort(key=lambda s: s.name)
    for attribute in ("name", "role"):
        values = [getattr(s, attribute) for s in found]
        if len(set(values)) != len(values):
            raise ValueError(f"two services share a {attribute}: {values}")
    return tuple(found)


def service_names() -> list[str]:
    return [spec.name for spec in specs()]


def by_name(name: str) -> ServiceSpec:
    for spec in specs():
        if spec.name == name:
            return spec
    raise UnknownService(name)


def by_role(role: str) -> ServiceSpec | None:
    return next((spec for spec in specs() if spec.role == role), None)


def service_roles() -> list[str]:
    return [spec.role for spec in specs()]


def packages() -> list[str]:
    """The import packages of every service (for a child process's PYTHONPATH)."""
    return [spec.package for spec in specs()]
