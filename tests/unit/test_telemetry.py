"""The pure parts of telemetry: instrument declaration, the exporter decision from the
`OTEL_*` variables, server spans from NATS headers, and the status records the
services turn into gauges."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY, Counter

from cfs import telemetry
from cfs_backup.service import record_backup_status
from cfs_contracts.backup import ArchiveStream, BackupStatus
from cfs_contracts.geo import GeoApplied, ShardApplied
from cfs_contracts.members import Liveness
from cfs_contracts.tier import NodeFlash, S3Health, TierMode, TierState, WritePolicy
from cfs_georep.service import applied_lag_s, record_applied
from cfs_membership.service import state_counts
from cfs_tierer.service import record_tier_state


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


# -- instruments -----------------------------------------------------------------------
def test_instruments_get_the_prefix_and_are_declared_once_per_process() -> None:
    first = telemetry.counter("unit_things", "things counted by a unit test")
    again = telemetry.counter("cfs_unit_things", "the same, declared by another module")
    assert first is again
    first.inc(3)
    assert value("cfs_unit_things_total") == 3
    with pytest.raises(TypeError, match="is a Counter"):
        telemetry.gauge("unit_things", "a gauge under a counter's name")


def test_label_cache_hands_out_one_child_per_value() -> None:
    histogram = telemetry.histogram("unit_op_duration_seconds", "unit latencies", ("op",))
    children = telemetry.LabelCache(histogram)
    assert children("Create") is children("Create")
    children("Create").observe(0.002)
    assert value("cfs_unit_op_duration_seconds_count", op="Create") == 1
    assert value("cfs_unit_op_duration_seconds_bucket", op="Create", le="0.0025") == 1


def test_metrics_endpoint_is_off_at_port_zero_and_serves_text_otherwise() -> None:
    assert telemetry.serve_metrics(0) is None
    Counter("unit_scraped", "seen through the endpoint").inc()
    endpoint = telemetry.serve_metrics(_free_port())
    assert endpoint is not None
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
    finally:
        endpoint.close()
    assert "unit_scraped_total 1.0" in text


def _free_port() -> int:
    from cfs.supervisor.ports import free_port

    return free_port()


# -- the exporter decision -----------------------------------------------------------------
@pytest.mark.parametrize(
    ("env", "exporting"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "  "}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, False),
    ],
)
def test_an_exporter_only_when_an_endpoint_is_set(env: dict[str, str], exporting: bool) -> None:
    assert telemetry.otlp_endpoint_configured(env) is exporting


def test_no_endpoint_no_provider() -> None:
    assert telemetry.setup_tracing_from_env("unit", env={}) is None


# -- spans from headers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):  # the API lets a process set one once
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.clear()


def test_a_request_without_context_gets_no_server_span(exported: InMemorySpanExporter) -> None:
    assert telemetry.server_span("chunk-store put", None) is None
    assert telemetry.server_span("chunk-store put", {"Nats-Msg-Id": "x"}) is None
    unsampled = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    assert telemetry.server_span("chunk-store put", {"traceparent": unsampled}) is None
    with telemetry.serving("chunk-store put", {}), telemetry.child_span("commit", None):
        assert not trace.get_current_span().get_span_context().is_valid


def test_server_and_child_spans_continue_the_callers_trace(
    exported: InMemorySpanExporter,
) -> None:
    exported.clear()
    headers: dict[str, str] = {}
    with telemetry.tracer().start_as_current_span("fuse fsync") as client:
        telemetry.inject_headers(headers)
    assert telemetry.traced_request(headers)
    server = telemetry.server_span("metadata SetChunks", headers)
    assert server is not None
    with telemetry.child_span("metadata commit", server):
        pass
    server.end()
    with telemetry.serving("chunk-store put", headers):
        pass
    spans = {span.name: span for span in exported.get_finished_spans()}
    trace_id = client.get_span_context().trace_id
    assert {s.context.trace_id for s in spans.values()} == {trace_id}
    assert spans["metadata SetChunks"].parent.span_id == client.get_span_context().span_id
    assert spans["metadata commit"].parent.span_id == server.get_span_context().span_id
    assert spans["chunk-store put"].kind is trace.SpanKind.SERVER


# -- status records as gauges ------------------------------------------------------------------
def test_swim_state_counts_name_every_state() -> None:
    counts = state_counts([Liveness.ALIVE, Liveness.ALIVE, Liveness.SUSPECT])
    assert counts == {Liveness.ALIVE: 2, Liveness.SUSPECT: 1, Liveness.DOWN: 0, Liveness.LEFT: 0}


def test_tier_state_gauges() -> None:
    state = TierState(
        holder="storage-1",
        holder_since_ms=0,
        updated_ms=10_000,
        mode=TierMode.TIERED,
        level="WRITE_THROUGH",
        policy=WritePolicy.ACK_AFTER_S3,
        nodes=(
            NodeFlash(
                node="storage-2",
                level="CRITICAL",
                fill=0.93,
                unflushed_bytes=93,
                capacity_bytes=100,
            ),
        ),
        queue_entries=4,
        queue_bytes=4096,
        oldest_queued_ms=7_500,
        s3=S3Health(url="s3://bucket/tier", reachable=True),
    )
    record_tier_state(state, now_ms=10_000)
    assert value("cfs_tier_queue_entries") == 4
    assert value("cfs_tier_queue_bytes") == 4096
    assert value("cfs_tier_s3_lag_seconds") == 2.5
    assert value("cfs_tier_watermark_level") == 1
    assert value("cfs_tier_node_watermark_level", node="storage-2") == 2
    assert value("cfs_tier_node_flash_fill_ratio", node="storage-2") == 0.93


def test_backup_status_gauges() -> None:
    status = BackupStatus(
        node="storage-1",
        updated_ms=100_000,
        last_snapshot_ms=40_000,
        archive=(ArchiveStream(stream="META_001", archived_seq=7, journal_seq=9, lag_s=1.5),),
    )
    record_backup_status(status)
    assert value("cfs_backup_age_seconds") == 60
    assert value("cfs_backup_archive_lag_seconds", stream="META_001") == 1.5
    assert value("cfs_backup_archived_seq", stream="META_001") == 7


def test_replication_lag_is_zero_with_nothing_pending() -> None:
    assert applied_lag_s(ShardApplied(position=5, pending=0, newest_ms=1_000), 9_000) == 0
    assert applied_lag_s(ShardApplied(position=5, pending=3, newest_ms=1_000), 9_000) == 8
    assert applied_lag_s(ShardApplied(position=0, pending=3, newest_ms=None), 9_000) == 0
    record_applied(
        GeoApplied(
            peer="b", shards={1: ShardApplied(position=5, pending=2, newest_ms=0)}, updated_ms=500
        )
    )
    assert value("cfs_georep_pending_messages", shard="001") == 2
    assert value("cfs_georep_apply_lag_seconds", shard="001") == 0.5


def test_shutdown_gives_a_hanging_collector_bounded_time() -> None:
    class Stuck(TracerProvider):
        def shutdown(self) -> None:
            time.sleep(5)

    started = time.monotonic()
    telemetry.shutdown_tracing(Stuck(shutdown_on_exit=False), wait_s=0.2)
    telemetry.shutdown_tracing(None)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize(
    ("env", "ratio"),
    [
        ({}, 0.01),  # ours, not the SDK's every operation
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0),
        ({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio"}, 1.0),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
            0.01,
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "x"}, 1.0),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, None),
    ],
)
def test_the_share_of_traced_operations_comes_from_the_standard_variables(
    env: dict[str, str], ratio: float | None
) -> None:
    assert telemetry.root_sampling(env) == ratio


def test_root_spans_sample_once_at_the_edge(exported: InMemorySpanExporter) -> None:
    exported.clear()
    off = telemetry.RootSpans(telemetry.tracer(), 0.0)
    with off("fuse write"):
        assert not telemetry.in_trace()
    every = telemetry.RootSpans(telemetry.tracer(), 1.0)
    with every("fuse write"):
        assert telemetry.in_trace()
        with telemetry.publish_span("publish MetaCommitted"):
            pass
    some = telemetry.RootSpans(telemetry.tracer(), 0.25)
    for _ in range(400):
        with some("fuse write"):
            pass
    names = [span.name for span in exported.get_finished_spans()]
    assert names[:2] == ["publish MetaCommitted", "fuse write"]
    assert 50 < len(names) - 2 < 150  # about a quarter of 400
    with every("fuse fsync"), some("fuse write"):  # inside a trace: always a child
        pass
    last = exported.get_finished_spans()[-2:]
    assert [span.name for span in last] == ["fuse write", "fuse fsync"]


def test_no_publish_or_consume_span_outside_a_trace(exported: InMemorySpanExporter) -> None:
    exported.clear()
    with telemetry.publish_span("publish X"), telemetry.consumer_span("consume X", {}):
        assert not telemetry.in_trace()
    assert exported.get_finished_spans() == ()
