"""OpenTelemetry wiring: W3C trace context travels in NATS message headers."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.propagate import extract, inject
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter

TRACER_NAME = "claudefs"


def setup_tracing(service: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install a tracer provider for this process; exporter optional (none = spans stay local)."""
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def inject_headers(headers: MutableMapping[str, str]) -> None:
    """Add `traceparent` (and `tracestate`) of the current span, if any."""
    if trace.get_current_span().get_span_context().is_valid:  # cheap check, hot path
        inject(headers)


def context_from_headers(headers: Mapping[str, str] | None) -> otel_context.Context:
    return extract(dict(headers or {}))
