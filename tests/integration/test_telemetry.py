"""Telemetry that leaves the processes of a real site: every service's `/metrics`
scraped over HTTP after a workload through a FUSE mount, and the trace of one FUSE
fsync exported over OTLP/HTTP to a receiver in this test, with spans of the mount, the
metadata writer and the chunk-stores under one trace id."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from cfs.fuse.config import is_fuse_mount
from cfs.security import Role
from cfs.supervisor import LocalSite, ManagedProcess
from cfs.supervisor.ports import free_port
from cfs.supervisor.site import child_pythonpath

pytestmark = [pytest.mark.timeout(180)]

SERVICES = ("metadata-raft", "chunk-store", "membership")
CREATES = 12


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    instance: str
    name: str
    trace_id: bytes
    span_id: bytes
    parent_id: bytes


class OtlpReceiver(ThreadingHTTPServer):
    """A loopback OTLP/HTTP traces endpoint: every span of every export request."""

    def __init__(self) -> None:
        spans: list[ExportedSpan] = []
        lock = threading.Lock()
        self.spans = spans

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    spans.extend(_spans_of(request))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


def _spans_of(request: ExportTraceServiceRequest) -> Iterator[ExportedSpan]:
    for resource_spans in request.resource_spans:
        attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                yield ExportedSpan(
                    attributes.get("service.name", ""),
                    attributes.get("service.instance.id", ""),
                    span.name,
                    span.trace_id,
                    span.span_id,
                    span.parent_span_id,
                )


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _otel_env(receiver: OtlpReceiver) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",  # this test's one write is traced
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[LocalSite]:
    base = tmp_path_factory.mktemp("telemetry")
    local = LocalSite(
        base / "site", nodes=3, servers=1, site="t", services=SERVICES, env=_otel_env(receiver)
    )
    asyncio.run(local.start())
    try:
        asyncio.run(local.wait_ready())
        yield local
    finally:
        local.stop()


@dataclass
class Mount:
    path: Path
    proc: ManagedProcess
    metrics_port: int


@pytest.fixture(scope="module")
def mount(
    site: LocalSite, receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("telemetry-mount")
    path = base / "mnt"
    path.mkdir()
    port = free_port()
    proc = ManagedProcess(
        "fuse-mount",
        [
            sys.executable,
            "-m",
            "cfs.fuse",
            str(path),
            "--cluster",
            ",".join(site.urls),
            "--site",
            site.site,
            "--credentials",
            str(site.credentials(Role.CLIENT)),
            "--client-id",
            "telemetry-mount",
        ],
        log_path=base / "mount.log",
        env={
            "PYTHONPATH": child_pythonpath(),
            "CFS_METRICS_PORT": str(port),
            **_otel_env(receiver),
        },
    )
    proc.start()
    try:
        proc.wait_until(lambda: is_fuse_mount(path), 30, "the FUSE mount")
        yield Mount(path, proc, port)
    finally:
        if proc.running:
            proc.stop(timeout=30)
        if is_fuse_mount(path):
            subprocess.run(["umount", "-l", str(path)], check=False)


def scrape(port: int) -> dict[str, float]:
    """`/metrics` of one process: sample name with its labels -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers.get_content_type() == "text/plain"
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.2)
    return found


def _write_files(root: Path, count: int) -> None:
    root.mkdir()
    for i in range(count):
        (root / f"f{i}").write_bytes(os.urandom(1000 + i))


def test_every_process_serves_the_documented_metrics_with_the_workload_in_them(
    site: LocalSite, mount: Mount
) -> None:
    before = scrape(mount.metrics_port).get("cfs_client_creates_total", 0.0)
    _write_files(mount.path / "metrics", CREATES)

    client = scrape(mount.metrics_port)
    assert client["cfs_client_creates_total"] - before == CREATES
    assert client['cfs_client_metadata_op_duration_seconds_count{op="Create"}'] >= CREATES
    assert client['cfs_client_fragment_duration_seconds_count{verb="put"}'] >= CREATES

    ports = site.metrics_ports()
    assert {service for _, service in ports} == set(SERVICES)
    scraped = {key: scrape(port) for key, port in ports.items()}
    for (node, service), samples in scraped.items():
        info = f'cfs_service_info{{node="{node}",service="{service}",site="t"}}'
        assert samples.get(info) == 1.0, (node, service)

    metadata = [s for (_, service), s in scraped.items() if service == "metadata-raft"]
    # The writer answered every create: the servers' count is the client's.
    creates = sum(s.get('cfs_metadata_op_duration_seconds_count{op="Create"}', 0) for s in metadata)
    assert creates == client['cfs_client_metadata_op_duration_seconds_count{op="Create"}']
    assert sum(s['cfs_metadata_leader{shard="001"}'] for s in metadata) == 1
    assert sum(s["cfs_metadata_journal_appends_total"] for s in metadata) >= 1
    assert all(s["cfs_metadata_journal_applied_total"] > 0 for s in metadata)
    assert all('cfs_metadata_replica_lag_records{shard="001"}' in s for s in metadata)

    stores = [s for (_, service), s in scraped.items() if service == "chunk-store"]
    puts = sum(
        s.get('cfs_chunkstore_request_duration_seconds_count{verb="put"}', 0) for s in stores
    )
    assert puts >= client['cfs_client_fragment_duration_seconds_count{verb="put"}']
    assert sum(s["cfs_chunkstore_put_bytes_total"] for s in stores) > CREATES * 1000

    for (_, service), samples in scraped.items():
        if service == "membership":
            assert samples['cfs_swim_members{state="alive"}'] == len(site.node_names)
            assert samples['cfs_swim_members{state="down"}'] == 0


def test_one_fsync_is_one_trace_across_the_mount_the_metadata_writer_and_chunk_stores(
    site: LocalSite, mount: Mount, receiver: OtlpReceiver
) -> None:
    path = mount.path / "traced"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, os.urandom(64 * 1024))
        os.fsync(fd)
    finally:
        os.close(fd)

    def fsync_trace() -> set[tuple[str, str]] | None:
        fsyncs = [s for s in receiver.spans if s.name == "fuse fsync"]
        if not fsyncs:
            return None
        trace_id = fsyncs[-1].trace_id
        processes = {(s.service, s.instance) for s in receiver.spans if s.trace_id == trace_id}
        names = {s.name for s in receiver.spans if s.trace_id == trace_id}
        wanted = {"chunk-store put", "metadata commit"}
        return processes if len(processes) >= 3 and wanted <= names else None

    processes = until(fsync_trace, 20, "the fsync's spans from three processes")
    services = {service for service, _ in processes}
    assert {"fuse-mount", "metadata-raft", "chunk-store"} <= services
    assert len({instance for service, instance in processes if service == "chunk-store"}) >= 2
