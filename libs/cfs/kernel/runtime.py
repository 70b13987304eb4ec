"""One runtime for every service spec (DESIGN.md §2, STYLE.md #11).

    bus connected ─► health record ─► the service's components (spec.start)
      ─► declared consumers ─► admin verbs ─► site-singleton lease ─► until SIGTERM

Everything is entered into one `AsyncExitStack` in that order and stopped in reverse;
every long-running task lives in one `TaskGroup`. A task spawned with `CRASH` (the
default) that fails takes the process down with one log line and a non-zero exit, so
the supervisor (`cfs dev`, Nomad, systemd) restarts it; a task spawned with `DEGRADE`
marks the service degraded in its health record, which `cfs admin status` shows.
Nothing fails silently.

Singleton work (`spec.singleton.work` and `singleton=True` consumers) runs only while
this process holds the `service.<name>` lease: it starts on acquisition and is
cancelled as soon as the lease loop steps down, which happens before the lease can
expire (the holder stops `margin_s` early) and is noticed within one renew interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from enum import StrEnum
from typing import TYPE_CHECKING, Any, TypeVar

from nats.js.kv import KeyValue

from cfs.bus import Bus, ConsumerSpec, DurableConsumer
from cfs.bus.consumer import Handler
from cfs.kernel.spec import ServiceSpec, Singleton
from cfs.retry import Backoff, RetryPolicy, any_bus_error, is_temporary, retry
from cfs.telemetry import gauge, serve_metrics
from cfs_contracts.members import ServiceHealth, health_key
from cfs_contracts.streams import HEALTH

if TYPE_CHECKING:
    from cfs.client.nodes import NodeView
    from cfs.lease import Lease

log = logging.getLogger(__name__)

T = TypeVar("T")

HEARTBEAT_S = 5.0
STARTUP_WAIT_S = 120.0  # JetStream may still be electing right after servers restart
CANCEL_AGAIN_S = 0.5  # see cancel_and_wait

SERVICE_INFO = gauge("service_info", "1 per running service process", ("service", "node", "site"))


class OnFailure(StrEnum):
    CRASH = "crash"  # the process exits; its supervisor restarts it
    DEGRADE = "degrade"  # the service goes on without this task, visibly degraded


class ServiceCrashed(Exception):
    """A `CRASH` task failed; the process ends (run_spec logs it as one line)."""

    def __init__(self, service: str, task: str, error: BaseException) -> None:
        super().__init__(f"{service}: task {task} failed: {type(error).__name__}: {error}")
        self.task = task
        self.error = error


Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


def unsupervised(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """A task outside any runtime (components built directly by tests or tools): never
    silent either; its failure is logged with the traceback."""
    task = asyncio.create_task(coro, name=name)
    task.add_done_callback(_log_failure)
    return task


def _log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("task.failed", extra={"task": task.get_name()}, exc_info=exc)


class Health:
    """This process's `ServiceHealth` record: degraded components and singleton state,
    written on every change and every `heartbeat_s`."""

    def __init__(self, bus: Bus, service: str, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.bus = bus
        self.service = service
        self.heartbeat_s = heartbeat_s
        self.degraded: dict[str, str] = {}
        self.singleton = ""
        self.started_ms = _wall_ms()
        self._kv: KeyValue | None = None
        self._changed = asyncio.Event()

    @property
    def key(self) -> str:
        return health_key(self.bus.node, self.service)

    def degrade(self, component: str, reason: str) -> None:
        if self.degraded.get(component) != reason:
            log.error(
                "service.degraded",
                extra={"service": self.service, "component": component, "reason": reason},
            )
            self.degraded[component] = reason
            self._changed.set()

    def recover(self, component: str) -> None:
        if self.degraded.pop(component, None) is not None:
            log.info("service.recovered", extra={"service": self.service, "component": component})
            self._changed.set()

    def set_singleton(self, state: str) -> None:
        if state != self.singleton:
            self.singleton = state
            self._changed.set()

    def record(self) -> ServiceHealth:
        return ServiceHealth(
            service=self.service,
            node=self.bus.node,
            pid=os.getpid(),
            started_ms=self.started_ms,
            updated_ms=_wall_ms(),
            heartbeat_s=self.heartbeat_s,
            degraded=dict(self.degraded),
            singleton=self.singleton,
        )

    async def start(self) -> None:
        self._kv = await until_jetstream_answers(
            "health bucket", lambda: self.bus.key_value(HEALTH.bucket)
        )
        await self._write()

    async def run(self) -> None:
        """Write on change or every heartbeat. A failed write is retried at the next
        beat (NATS may be re-electing); the record's age tells readers it is stale."""
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.heartbeat_s):
                    await self._changed.wait()
            self._changed.clear()
            try:
                await self._write()
                failures = 0
            except Exception as exc:
                if not any_bus_error(exc):
                    raise
                failures += 1
                level = logging.INFO if failures < 3 else logging.WARNING
                log.log(level, "health.write_failed", extra={"error": repr(exc), "n": failures})

    async def remove(self) -> None:
        """A clean stop: the record goes (a stale one means a crash). Without NATS it
        stays, and its age tells readers the process is gone."""
        if self._kv is not None and not self.bus.nc.is_connected:
            log.info("health.remove_skipped", extra={"reason": "NATS unreachable"})
        elif self._kv is not None:
            try:
                async with asyncio.timeout(2.0):
                    await self._kv.delete(self.key)
            except Exception as exc:
                if not any_bus_error(exc):
                    raise
                log.info("health.remove_failed", extra={"error": repr(exc)})

    async def _write(self) -> None:
        assert self._kv is not None
        async with asyncio.timeout(max(2.0, self.heartbeat_s)):
            await self._kv.put(self.key, self.record().model_dump_json().encode())


class Context:
    """What a running service's code gets from the runtime: its settings, the bus, a
    place for its components (`enter`, stopped in reverse order), supervised tasks
    (`spawn`), the shared nodes view, health, and (site singletons) its lease."""

    def __init__(
        self, spec: ServiceSpec, settings: Any, bus: Bus, tasks: asyncio.TaskGroup
    ) -> None:
        self.spec = spec
        self.settings = settings
        self.bus = bus
        self.node: str = bus.node
        self.site: str = bus.site
        self.stack = AsyncExitStack()
        self.health = Health(bus, spec.name)
        self.lease: Lease | None = None  # while the service has a site-singleton lease
        self.service: Any = None  # what `spec.start` returned: the singleton's work uses it
        self._tasks = tasks
        self._spawned: set[asyncio.Task[Any]] = set()
        self._nodes: NodeView | None = None

    async def enter(self, component: AbstractAsyncContextManager[T]) -> T:
        """Start a component now; it stops when the service stops, in reverse order."""
        return await self.stack.enter_async_context(component)

    def on_stop(self, callback: Callable[[], Awaitable[Any]]) -> None:
        self.stack.push_async_callback(callback)

    def spawn(
        self,
        coro: Coroutine[Any, Any, Any],
        name: str,
        *,
        on_failure: OnFailure = OnFailure.CRASH,
    ) -> asyncio.Task[Any]:
        """A background task in the service's task group (see the module docstring).

        Once the service is shutting down (stopped, or a task crashed) nothing new
        starts: the caller, itself being torn down, gets CancelledError."""
        try:
            task = self._tasks.create_task(self._watch(coro, name, on_failure), name=name)
        except RuntimeError:  # "TaskGroup ... is shutting down"
            coro.close()
            raise asyncio.CancelledError(
                f"{self.spec.name} is stopping; {name} not started"
            ) from None
        self._spawned.add(task)
        task.add_done_callback(self._spawned.discard)
        return task

    async def _watch(
        self, coro: Coroutine[Any, Any, Any], name: str, on_failure: OnFailure
    ) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if on_failure is OnFailure.DEGRADE:
                log.error("task.failed", extra={"task": name}, exc_info=exc)
                self.health.degrade(name, f"{type(exc).__name__}: {exc}")
                return
            log.critical("service.task_crashed", extra={"task": name}, exc_info=exc)
            raise ServiceCrashed(self.spec.name, name, exc) from exc

    def spawner(self, on_failure: OnFailure = OnFailure.CRASH) -> Spawn:
        """`spawn` as a plain function, for components that start tasks of their own."""
        return lambda coro, name: self.spawn(coro, name, on_failure=on_failure)

    async def nodes(self) -> NodeView:
        """The site's live nodes view (`cfs.client.nodes.NodeView`), started once."""
        if self._nodes is None:
            from cfs.client.nodes import NodeView

            view = NodeView(self.bus)
            await until_jetstream_answers("nodes view", view.start)
            self.on_stop(view.stop)
            self._nodes = view
        return self._nodes

    def consume(self, spec: ConsumerSpec, handler: Handler) -> DurableConsumer:
        """Run a durable consumer until the service stops (see `run_consumer`)."""
        consumer, task = self.run_consumer(spec, handler)

        async def stop() -> None:
            consumer.stop()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(3.0):
                    await asyncio.wait([task])
            await cancel_and_wait(task)

        self.on_stop(stop)
        return consumer

    def run_consumer(
        self, spec: ConsumerSpec, handler: Handler
    ) -> tuple[DurableConsumer, asyncio.Task[Any]]:
        """A durable consumer's sessions as a task: started again after any bus failure
        (the service is degraded meanwhile); a handler's own failures follow the
        consumer's ack policy (redelivery, then the dead-letter subject)."""
        consumer = DurableConsumer(self.bus, spec, handler)
        component = f"consumer {spec.stream}/{spec.durable}"

        async def sessions() -> None:
            policy = RetryPolicy(component, temporary=any_bus_error, deadline_s=None)
            backoff = Backoff(policy, extra={"service": self.spec.name})
            while not consumer.stopped:
                try:
                    await consumer.ensure()
                    self.health.recover(component)
                    await consumer.run()
                except Exception as exc:
                    if consumer.stopped:
                        return
                    if not any_bus_error(exc):
                        raise
                    self.health.degrade(component, f"{type(exc).__name__}: {exc}")
                    await backoff.wait(exc)

        return consumer, self.spawn(sessions(), component)

    async def cancel_remaining(self) -> None:
        """After the components stopped: whatever task is still running is cancelled."""
        await asyncio.gather(*(cancel_and_wait(task) for task in list(self._spawned)))


async def until_jetstream_answers(
    what: str, call: Callable[[], Awaitable[T]], *, wait_s: float = STARTUP_WAIT_S
) -> T:
    """Start-up reads of a restarted node: JetStream answers once the streams involved
    have elected leaders again (seconds after servers restart)."""
    policy = RetryPolicy(what, temporary=is_temporary, deadline_s=wait_s, first_delay_s=0.25)
    return await retry(call, policy)


async def run(spec: ServiceSpec, settings: Any, stop: asyncio.Event) -> None:
    """Run `spec` until `stop` is set or a `CRASH` task fails (ServiceCrashed)."""
    bus = await settings.connect(spec.name)
    try:
        async with asyncio.TaskGroup() as tasks:
            ctx = Context(spec, settings, bus, tasks)
            stopped = tasks.create_task(stop.wait(), name="stop signal")
            try:
                async with ctx.stack:
                    await _start(ctx)
                    log.info("service.started", extra={"service": spec.name, "node": ctx.node})
                    await stopped
                    log.info("service.stopping", extra={"service": spec.name, "node": ctx.node})
            finally:
                stopped.cancel()
                await ctx.cancel_remaining()
    except BaseExceptionGroup as group:
        crashed = group.subgroup(ServiceCrashed)
        if crashed is not None:
            raise _first(crashed) from None
        raise
    finally:
        await bus.close(drain=False)  # every component has stopped: nothing to drain
        log.info("service.stopped", extra={"service": spec.name, "node": bus.node})


async def _start(ctx: Context) -> None:
    spec = ctx.spec
    _serve_metrics(ctx)
    await ctx.health.start()
    ctx.on_stop(ctx.health.remove)
    beat = ctx.spawn(ctx.health.run(), "health")
    ctx.on_stop(lambda: cancel_and_wait(beat))
    if spec.start is not None:
        ctx.service = await spec.start(ctx)
    for consumer in spec.consumers:
        if not consumer.singleton:
            ctx.consume(consumer.for_site(ctx.site), consumer.handler(ctx))
    if spec.admin:
        from cfs.admin.executor import CommandExecutor

        handlers = {verb: declared.handler(ctx) for verb, declared in spec.admin.items()}
        executor = CommandExecutor(ctx.bus, spec.name, handlers)
        ctx.consume(executor.consumer_spec, executor.handle)
    if spec.singleton is not None:
        await _start_singleton(ctx)


def _serve_metrics(ctx: Context) -> None:
    """`/metrics` on the settings' `metrics_port` (0: none), for every service alike:
    services only declare and record their instruments (`cfs.telemetry`). A port that
    cannot be bound degrades the service rather than stopping the file system."""
    port = int(getattr(ctx.settings, "metrics_port", 0) or 0)
    SERVICE_INFO.labels(ctx.spec.name, ctx.node, ctx.site).set(1)
    if not port:
        return
    host = getattr(ctx.settings, "metrics_host", "127.0.0.1")
    try:
        endpoint = serve_metrics(port, host)
    except OSError as exc:
        ctx.health.degrade("metrics endpoint", f"cannot listen on {host}:{port}: {exc}")
        return
    if endpoint is not None:
        ctx.on_stop(lambda: asyncio.to_thread(endpoint.close))


async def _start_singleton(ctx: Context) -> None:
    """The lease, and the singleton's work started on acquisition, cancelled on loss."""
    from cfs.lease import Lease

    spec = ctx.spec
    singleton = spec.singleton
    assert singleton is not None and spec.lease_key is not None
    nodes = await ctx.nodes()
    rule = singleton.eligible

    def eligible() -> bool:
        return rule(ctx) if rule is not None else nodes.in_service(ctx.node)

    running: list[asyncio.Task[Any]] = []
    consumers: list[DurableConsumer] = []

    async def acquired(term: int) -> None:
        await lost(term, "acquired again")  # never two generations of work at once
        ctx.health.set_singleton("holding")
        for declared in spec.consumers:
            if declared.singleton:
                config = declared.for_site(ctx.site)
                consumer, task = ctx.run_consumer(config, declared.handler(ctx))
                consumers.append(consumer)
                running.append(task)
        running.append(ctx.spawn(_work(ctx, singleton, term), f"{spec.name} term {term}"))
        log.info("singleton.started", extra={"service": spec.name, "term": term})

    async def lost(term: int, reason: str) -> None:
        ctx.health.set_singleton("standby")
        for consumer in consumers:
            consumer.stop()
        tasks = list(running)
        running.clear()
        consumers.clear()
        if tasks:
            await asyncio.gather(*(cancel_and_wait(task) for task in tasks))
            log.info(
                "singleton.stopped", extra={"service": spec.name, "term": term, "reason": reason}
            )

    lease = Lease(
        ctx.bus,
        spec.lease_key,
        ctx.node,
        lease_s=getattr(ctx.settings, "singleton_lease_s", None) or singleton.lease_s,
        renew_s=getattr(ctx.settings, "singleton_renew_s", None) or singleton.renew_s,
        eligible=eligible,
        on_acquired=acquired,
        on_lost=lost,
        spawn=ctx.spawner(),
    )
    ctx.lease = lease
    ctx.health.set_singleton("standby")
    await lease.start()
    ctx.on_stop(lease.stop)


WORK_STABLE_S = 10.0  # singleton work that ran this long after a restart is healthy again


async def _work(ctx: Context, singleton: Singleton, term: int) -> None:
    """The singleton's work for one term. A bus failure (a server lost with its node, a
    stream still electing) starts it again after a backoff, the service degraded
    meanwhile, as a consumer's session is; any other failure crashes the process."""
    component = f"{ctx.spec.name} term {term}"
    policy = RetryPolicy(component, temporary=only_bus_errors, deadline_s=None)
    backoff = Backoff(policy, extra={"service": ctx.spec.name, "term": term})
    loop = asyncio.get_running_loop()
    while True:
        healthy = loop.call_later(WORK_STABLE_S, ctx.health.recover, component)
        try:
            await singleton.work(ctx)
            break
        except Exception as exc:
            if not only_bus_errors(exc):
                raise
            ctx.health.degrade(component, f"restarting after {_describe_group(exc)}")
            await backoff.wait(exc)
        finally:
            healthy.cancel()
    ctx.health.recover(component)
    log.info("singleton.work_finished", extra={"service": ctx.spec.name, "term": term})


def only_bus_errors(exc: BaseException) -> bool:
    """`any_bus_error`, through task groups: a group fails for the bus if all of it did."""
    if isinstance(exc, BaseExceptionGroup):
        return all(only_bus_errors(inner) for inner in exc.exceptions)
    return any_bus_error(exc)


def _describe_group(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and return once it has ended; its failure is for whoever supervises it.

    Python 3.11's `asyncio.wait_for`, which nats-py awaits in every request and `next_msg`,
    drops a cancellation that lands just as its result arrives: the task goes on as if it
    had never been cancelled (a journal tail then tails forever, and its service ignores
    SIGTERM until it is killed). So a task still running `CANCEL_AGAIN_S` after a cancel
    is cancelled again. Our caller's own cancellation is never swallowed here.
    """
    if task is None:
        return
    again = False
    while not task.done():
        if again:
            log.info("task.cancelled_again", extra={"task": task.get_name()})
        task.cancel()
        await asyncio.wait([task], timeout=CANCEL_AGAIN_S)
        again = True


async def wait_for(awaitable: Awaitable[T], timeout: float | None) -> T:
    """`asyncio.wait_for` as Python 3.12 has it: `asyncio.timeout` around the await.

    Python 3.11's returns a result that arrives just as its caller is cancelled, and the
    cancellation is lost (python/cpython#86296, fixed in 3.12 by this implementation).
    nats-py awaits `asyncio.wait_for` in every request, flush, fetch and `next_msg`, so
    a service task could miss the cancel that stops it; `use_cancellable_wait_for`
    puts this one in its place in every service process."""
    if timeout is not None and timeout <= 0:  # 3.12: the awaitable is not even started
        future = asyncio.ensure_future(awaitable)
        if not future.done():
            future.cancel()
            await asyncio.wait([future])
        try:
            return future.result()
        except asyncio.CancelledError as exc:
            raise TimeoutError from exc
    async with asyncio.timeout(timeout):
        return await awaitable


def use_cancellable_wait_for() -> None:
    """For this process, `asyncio.wait_for` is `wait_for` above (before Python 3.12)."""
    if sys.version_info < (3, 12):
        asyncio.wait_for = wait_for  # type: ignore[assignment]


def _first(group: BaseExceptionGroup[ServiceCrashed]) -> ServiceCrashed:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            return _first(exc)
        return exc
    raise AssertionError("empty exception group")


def _wall_ms() -> int:
    return time.time_ns() // 1_000_000


@contextlib.asynccontextmanager
async def started(component: Any) -> AsyncIterator[Any]:
    """`start()` now, `stop()` when the service stops: for components with that shape."""
    await component.start()
    try:
        yield component
    finally:
        await component.stop()
