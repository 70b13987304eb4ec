"""What a service declares about itself, once (DESIGN.md §2, "service spec").

Each service package has a `spec` module exporting `SPEC: ServiceSpec`. Everything that
lists services or their rights is derived from these declarations: `cfs service run`,
the dev supervisor's processes, the NATS permissions of each role and the auth config,
the checks of the compose and Nomad files. The runtime (`cfs.kernel.runtime`) runs any
spec: it connects, starts the declared consumers, admin verbs and site-singleton lease,
then the service's own components, under one exit stack and task group.

Spec modules import only what declaring needs; the heavy service code is imported by
the `start` function when the process runs, so the CLI can list every service cheaply.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cfs.admin.decide import Verdict
    from cfs.bus.consumer import ConsumerSpec, Handler
    from cfs.kernel.runtime import Context
    from cfs.service_main import ServiceSettings
    from cfs_contracts.events.admin import AdminCommandIssued

CommandHandler = Callable[["AdminCommandIssued"], Awaitable["Verdict"]]


class Deferred:
    """`module:name`, imported when first used (or when `load` is called): a spec names
    its service's settings, start and handlers without importing the service, so `cfs
    service list` and the permission table stay cheap. The runtime loads every one
    before the service starts: an import must never stall a running event loop (a SWIM
    member that imports for 100 ms misses its probes)."""

    def __init__(self, target: str, *, call: bool) -> None:
        module, _, name = target.partition(":")
        if not module or not name:
            raise ValueError(f"{target!r} is not module:name")
        self.target, self._module, self._name, self._call = target, module, name, call
        self._found: Any = None

    def load(self) -> Any:
        if self._found is None:
            self._found = getattr(importlib.import_module(self._module), self._name)
        return self._found

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        found = self.load()
        return found(*args, **kwargs) if self._call else found

    def __repr__(self) -> str:
        return f"<{self.target}>"


def imported(target: str) -> Callable[[], Any]:
    """`module:name` as a function that returns it (a settings class)."""
    return Deferred(target, call=False)


def deferred(target: str) -> Callable[..., Any]:
    """`module:function` as a function that forwards its arguments to it (a start, a
    singleton's work, a handler factory)."""
    return Deferred(target, call=True)


@dataclass(frozen=True)
class Grants:
    """The subjects a service touches beyond what the runtime derives from its consumers,
    admin verbs, lease and health record. `{s}` stands for `cfs.<site>`; `{n}` for the
    node a per-node service's key belongs to (`ServiceSpec.per_node`); a stream named
    `META_*` means every shard's journal.

    `publish`: subjects it publishes events or sends requests on. `serve`: subjects it
    subscribes to and answers. `read_streams`: streams it reads by direct get or an
    ephemeral consumer. `read_buckets`: KV buckets it reads or watches (everyone reads
    `nodes`). `write_keys`: bucket -> key patterns it creates, updates or deletes.
    `stepdown`: streams whose Raft leader it may ask to step down.
    """

    publish: tuple[str, ...] = ()
    serve: tuple[str, ...] = ()
    read_streams: tuple[str, ...] = ()
    read_buckets: tuple[str, ...] = ()
    write_keys: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    stepdown: tuple[str, ...] = ()


@dataclass(frozen=True)
class Consumer:
    """A durable consumer the runtime runs for the service, with its ack policy.

    `config.filter_subject` may hold `{s}`. `handler(ctx)` builds the handler once the
    service's components exist. `singleton`: consume only while this process holds the
    service's site lease (the durable is shared, so a hand-over resumes at the first
    unacknowledged message)."""

    config: ConsumerSpec
    handler: Callable[[Context], Handler]
    singleton: bool = False

    def for_site(self, site: str) -> ConsumerSpec:
        subject = self.config.filter_subject
        if subject is None:
            return self.config
        return replace(self.config, filter_subject=subject.format(s=f"cfs.{site}"))


@dataclass(frozen=True)
class AdminVerb:
    """An admin command this service executes (`cfs.<site>.cmd.<service>.<verb>`);
    `handler(ctx)` builds the handler, whose `Verdict` becomes the reply and the audit."""

    handler: Callable[[Context], CommandHandler]
    help: str = ""


@dataclass(frozen=True)
class Singleton:
    """One active instance per site: the `service.<name>` lease. `work(ctx)` runs only
    while the lease is held and is cancelled within one renew interval of losing it;
    `eligible(ctx)` says whether this node may hold it (default: alive and in service)."""

    work: Callable[[Context], Awaitable[None]]
    lease_s: float = 5.0
    renew_s: float = 1.0
    eligible: Callable[[Context], bool] | None = None


# Starts the service's components (entered into `ctx`); what it returns is `ctx.service`.
Start = Callable[["Context"], Awaitable[object]]


@dataclass(frozen=True)
class ServiceSpec:
    """One service: its name (as in DESIGN.md and `cfs service run NAME`), the credential
    role its processes connect with, the package run by `python -m`, its settings class,
    what it touches on the bus, and what the runtime starts for it."""

    name: str
    role: str
    package: str
    description: str
    settings: Callable[[], type[ServiceSettings]]
    grants: Grants = field(default_factory=Grants)
    consumers: tuple[Consumer, ...] = ()
    admin: Mapping[str, AdminVerb] = field(default_factory=dict)
    singleton: Singleton | None = None
    start: Start | None = None
    # Exceptions that end the process with one line instead of a traceback (bad config,
    # a port in use): the operator must act, a restart would not help.
    fatal: tuple[type[BaseException], ...] = ()
    # Only of use on a site linked to a peer site (DESIGN.md §8): a single dev site
    # leaves it out unless asked for it by name.
    needs_peer: bool = False
    # Its processes hold one key per node (`chunkstore@storage-1.nk`), with `{n}` in the
    # grants and the health record bound to that node: a node's key writes only that
    # node's records and answers only that node's requests (DESIGN.md §10).
    per_node: bool = False

    def load(self) -> None:
        """Import everything the spec names, before the service's event loop runs."""
        named: list[object] = [self.settings, self.start]
        named += [consumer.handler for consumer in self.consumers]
        named += [verb.handler for verb in self.admin.values()]
        if self.singleton is not None:
            named += [self.singleton.work, self.singleton.eligible]
        for item in named:
            if isinstance(item, Deferred):
                item.load()

    @property
    def lease_key(self) -> str | None:
        from cfs_contracts.streams import service_lease_key

        return service_lease_key(self.name) if self.singleton is not None else None
