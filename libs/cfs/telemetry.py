"""Telemetry that leaves the process: Prometheus metrics and OpenTelemetry traces.

Metrics are `prometheus_client` instruments, declared once per module with `counter`,
`gauge` and `histogram` (names get the `cfs_` prefix) and recorded in memory always: a
bound histogram's `observe` costs ~0.6 µs, the OpenTelemetry SDK's `record` ~5 µs
(measured; see the README's telemetry section). `serve_metrics` exposes them at
`/metrics` over HTTP on the port of `CFS_METRICS_PORT` (0: no endpoint).

Traces: `setup_tracing_from_env` installs a tracer provider with an OTLP/HTTP exporter
behind a `BatchSpanProcessor` when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set, nothing otherwise (spans then cost next to
nothing). W3C trace context travels in NATS message headers (`inject_headers`,
`context_from_headers`); servers start child spans with `server_span`.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Generic, TypeVar
from wsgiref.simple_server import WSGIServer

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

log = logging.getLogger(__name__)

TRACER_NAME = "claudefs"
METRIC_PREFIX = "cfs_"
TRACEPARENT = "traceparent"

# Seconds: a metadata op or fragment put takes ~1-20 ms on a LAN, a failover seconds.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

SHUTDOWN_WAIT_S = 2.0  # the last batch of spans on exit, at most
OTLP_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


# -- metrics ---------------------------------------------------------------------------
M = TypeVar("M", bound=MetricWrapperBase)
_declared: dict[str, MetricWrapperBase] = {}
_declare_lock = threading.Lock()


def _declare(kind: type[M], name: str, make: Callable[[str], M]) -> M:
    """One instrument per name and process: modules that share a metric (the client
    library inside a service) get the same one instead of a duplicate-name error."""
    full = name if name.startswith(METRIC_PREFIX) else METRIC_PREFIX + name
    with _declare_lock:
        found = _declared.get(full)
        if found is None:
            found = _declared[full] = make(full)
    if not isinstance(found, kind):
        raise TypeError(f"metric {full} is a {type(found).__name__}, not a {kind.__name__}")
    return found


def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A monotonic count; the exposition adds `_total` to `name`."""
    return _declare(Counter, name, lambda full: Counter(full, doc, labelnames=tuple(labels)))


def gauge(name: str, doc: str, labels: Sequence[str] = ()) -> Gauge:
    """A value that goes up and down (a lag, a depth, a state count)."""
    return _declare(Gauge, name, lambda full: Gauge(full, doc, labelnames=tuple(labels)))


def histogram(
    name: str,
    doc: str,
    labels: Sequence[str] = (),
    buckets: Sequence[float] = LATENCY_BUCKETS,
) -> Histogram:
    """A latency distribution in seconds (`name` should end in `_seconds`)."""
    return _declare(
        Histogram,
        name,
        lambda full: Histogram(full, doc, labelnames=tuple(labels), buckets=tuple(buckets)),
    )


class LabelCache(Generic[M]):
    """Bound children of a labelled instrument, by one label value: `labels()` costs
    ~1 µs per call (a lock and a tuple), a dict hit ~50 ns; for per-operation paths."""

    def __init__(self, metric: M) -> None:
        self._metric = metric
        self._children: dict[str, M] = {}

    def __call__(self, value: str) -> M:
        child = self._children.get(value)
        if child is None:
            child = self._children[value] = self._metric.labels(value)
        return child


@dataclass
class MetricsEndpoint:
    """The `/metrics` HTTP server of this process (a daemon thread of prometheus_client)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=2.0)


def serve_metrics(port: int, host: str = "127.0.0.1") -> MetricsEndpoint | None:
    """Serve `/metrics` on `host:port`; port 0 means no endpoint (library use, tests)."""
    if port <= 0:
        return None
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)
    endpoint = MetricsEndpoint(server, thread)
    log.info("metrics.serving", extra={"host": host, "port": endpoint.port})
    return endpoint


# -- traces ----------------------------------------------------------------------------
def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install a tracer provider for this process; exporter optional (none = spans stay local)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _roots.tracer, _roots.ratio = tracer(), 1.0
    return provider


def otlp_endpoint_configured(env: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for an OTLP exporter (and the SDK is not off)."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(env.get(var, "").strip() for var in OTLP_ENDPOINT_VARS)


# Unset `OTEL_TRACES_SAMPLER`: 1 % of operations traced, not the SDK's every one. Tracing
# every create costs about 29 % of the create rate (bench/metadata.py), 1 % costs none
# measurable; `OTEL_TRACES_SAMPLER=parentbased_always_on` traces everything.
DEFAULT_SAMPLING = 0.01


def root_sampling(env: Mapping[str, str]) -> float | None:
    """The share of operations that start a trace, from the standard
    `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` (unset: `DEFAULT_SAMPLING`);
    None for a sampler other than the built-in ones, which is then left to the SDK."""
    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if not name:
        return DEFAULT_SAMPLING
    if name in ("always_on", "parentbased_always_on"):
        return 1.0
    if name in ("always_off", "parentbased_always_off"):
        return 0.0
    if name in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = float(env.get("OTEL_TRACES_SAMPLER_ARG", "") or 1.0)
        except ValueError:
            ratio = 1.0
        return min(1.0, max(0.0, ratio))
    return None


class RootSpans:
    """Spans that start a trace at an edge of the system (a FUSE operation, a client
    call), sampled here once at `ratio`: an operation left out costs one `random()`
    rather than the SDK's ~8 µs of non-recording span, and carries no context, so the
    services it reaches do no tracing work for it at all. Inside a trace already, a
    span is a plain child. Ratio 0: tracing is off."""

    def __init__(self, tracer_: trace.Tracer | None = None, ratio: float = 0.0) -> None:
        self.tracer = tracer_
        self.ratio = ratio

    def __call__(self, name: str) -> AbstractContextManager[object]:
        ratio = self.ratio
        if ratio <= 0.0 or self.tracer is None:
            return nullcontext()
        if ratio < 1.0 and random.random() >= ratio and not in_trace():
            return nullcontext()
        return self.tracer.start_as_current_span(name)


_roots = RootSpans()


def root_span(name: str) -> AbstractContextManager[object]:
    """A trace for this edge operation, as often as `OTEL_TRACES_SAMPLER` asks (see
    `RootSpans`); nothing at all while this process does not export traces."""
    return _roots(name)


def in_trace() -> bool:
    """Whether the current span is part of a sampled trace (what a child joins)."""
    span_context = trace.get_current_span().get_span_context()
    return span_context.is_valid and span_context.trace_flags.sampled


def setup_tracing_from_env(
    service: str, node: str = "", env: Mapping[str, str] | None = None
) -> TracerProvider | None:
    """A provider exporting over OTLP/HTTP in batches when an endpoint is configured
    (the exporter reads the other `OTEL_EXPORTER_OTLP_*` variables itself), else None:
    no provider at all, so every span is a no-op.

    Traces start only at edges (`root_span`), sampled there at the configured ratio;
    services add spans only inside a sampled trace, so the SDK keeps every span it
    is given (`ParentBased(ALWAYS_ON)`). A sampler of another kind is left to the SDK."""
    env = os.environ if env is None else env
    if not otlp_endpoint_configured(env):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

    attributes = {"service.name": service}
    if node:
        attributes["service.instance.id"] = node
    ratio = root_sampling(env)
    # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES; ours name the process.
    provider = TracerProvider(
        resource=Resource.create(attributes),
        sampler=ParentBased(ALWAYS_ON) if ratio is not None else None,  # None: from env
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _roots.tracer, _roots.ratio = tracer(), 1.0 if ratio is None else ratio
    log.info(
        "tracing.exporting",
        extra={"service": service, "exporter": "otlp/http", "root_ratio": _roots.ratio},
    )
    return provider


def shutdown_tracing(provider: TracerProvider | None, wait_s: float = SHUTDOWN_WAIT_S) -> None:
    """Export what is still batched, for at most `wait_s`: the SDK's own shutdown waits
    up to 30 s for a collector that does not answer, and a stopping service must end
    well within its supervisor's patience (the rest is dropped, said in one line)."""
    if provider is None:
        return
    stopping = threading.Thread(target=provider.shutdown, name="tracing-shutdown", daemon=True)
    stopping.start()
    stopping.join(wait_s)
    if stopping.is_alive():
        log.warning("tracing.shutdown_overdue", extra={"after_s": wait_s})


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) of the current span if it is sampled: a
    trace the sampler dropped costs the servers nothing (no header, no span)."""
    if in_trace():  # cheap, hot path
        inject(headers)


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    return extract(dict(headers or {}))


def traced_request(headers: Mapping[str, str] | None) -> bool:
    """Whether a request carries a sampled trace context (a dict lookup: the untraced
    path pays nothing more). The sampled flag is bit 0 of the `traceparent` flags."""
    if not headers:
        return False
    parent = headers.get(TRACEPARENT)
    if parent is None or len(parent) < 2:
        return False
    try:
        return bool(int(parent[-2:], 16) & 1)
    except ValueError:
        return False


def server_span(name: str, headers: Mapping[str, str] | None) -> trace.Span | None:
    """A server span, child of the caller's context in `headers`; None when the request
    carries none (not started, not current: the caller ends it when it answers)."""
    if not traced_request(headers):
        return None
    return tracer().start_span(
        name, context=context_from_headers(headers), kind=trace.SpanKind.SERVER
    )


@contextmanager
def child_span(name: str, parent: trace.Span | None) -> Iterator[None]:
    """A current span under `parent` for the block (what it publishes carries it), or
    nothing at all when there is no parent: untraced work pays one `is None`."""
    if parent is None:
        yield
        return
    with tracer().start_as_current_span(name, context=trace.set_span_in_context(parent)):
        yield


@contextmanager
def serving(name: str, headers: Mapping[str, str] | None) -> Iterator[None]:
    """The block as a server span, current, child of the caller's context in `headers`;
    nothing when the request carries none."""
    span = server_span(name, headers)
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=True):
        yield


def consumer_span(name: str, headers: Mapping[str, str] | None) -> AbstractContextManager[object]:
    """A consumer's span for one message, child of the trace it carries; nothing for a
    message outside any sampled trace."""
    if not traced_request(headers):
        return nullcontext()
    return tracer().start_as_current_span(
        name, context=context_from_headers(headers), kind=trace.SpanKind.CONSUMER
    )


def publish_span(name: str) -> AbstractContextManager[object]:
    """A publisher's span, inside a sampled trace only (what it sends then carries it)."""
    return tracer().start_as_current_span(name) if in_trace() else nullcontext()
