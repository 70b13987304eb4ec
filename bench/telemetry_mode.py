"""Telemetry on and off for the benchmarks' `telemetry_overhead_ratio` (issue 17).

"On" is what an operator runs: every measured service process with its `/metrics`
endpoint scraped every `SCRAPE_S` from the moment it starts (at the scraper's own
pace, as Prometheus would, not in step with the measured run), an OTLP/HTTP exporter
sending its spans to a receiver that decodes every export as a collector would (both
in a process of their own, `Collector`, as Prometheus and a collector would be), and
the bench's own client tracing each operation as the FUSE mount does (a root span per
call, its context carried to the servers). Traces are head-sampled at 1 % with the
standard `OTEL_TRACES_SAMPLER` variables (`telemetry_overhead_ratio`) and, for
comparison, kept whole (`telemetry_overhead_ratio_always_on`). "Off" is no endpoint
and no tracer provider anywhere. The processes are restarted into each mode; the
modes alternate, each round starting with the next one, so drift on a shared machine
falls on all alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased

from cfs.supervisor import ManagedProcess
from cfs.telemetry import RootSpans
from cpu_accounting import cpu_us_per_op, role_cpu_seconds

# Prometheus scrapes every minute by default, 15 s is common; every 5 s is a strict
# setting, not a quiet one.
SCRAPE_S = 5.0
# After a restart the processes elect, catch up and warm their caches for a while
# after they answer ready: measured runs start once that has passed, in every mode.
SETTLE_S = 2.0


class SpanSink(ThreadingHTTPServer):
    """An OTLP/HTTP traces receiver on loopback that decodes and counts what it gets."""

    def __init__(self) -> None:
        self.spans = 0
        self.exports = 0
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                request = ExportTraceServiceRequest.FromString(body)
                count = sum(
                    len(scope.spans)
                    for resource in request.resource_spans
                    for scope in resource.scope_spans
                )
                with lock:
                    sink.spans += count
                    sink.exports += 1
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> SpanSink:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
        self.server_close()


class Scraper:
    """GETs every `/metrics` URL every `SCRAPE_S` in a thread, as Prometheus would."""

    def __init__(self, ports: Iterable[int]) -> None:
        self.urls = [f"http://127.0.0.1:{port}/metrics" for port in ports]
        self.scrapes = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        response.read()
                    self.scrapes += 1
                except OSError:
                    self.failures += 1
            if self._stop.wait(SCRAPE_S):
                return

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Collector:
    """The collector and the scraper an operator runs, in a process of their own (as
    Prometheus and an OpenTelemetry collector would be), so decoding spans and
    scraping take no time from the measured client's event loop: `collector_main`
    on the other end of a pipe."""

    def __init__(self) -> None:
        self._proc = subprocess.Popen(
            [sys.executable, __file__, "--collector"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.endpoint = self._ask("")
        self.scrapes = 0
        self.spans = 0

    def _ask(self, command: str) -> str:
        assert self._proc.stdin is not None and self._proc.stdout is not None
        if command:
            self._proc.stdin.write(command + "\n")
            self._proc.stdin.flush()
        return self._proc.stdout.readline().strip()

    @contextlib.contextmanager
    def scraping(self, ports: Iterable[int]) -> Iterator[None]:
        self._ask("scrape " + ",".join(str(p) for p in ports))
        try:
            yield
        finally:
            self.scrapes += int(self._ask("stop"))

    def __enter__(self) -> Collector:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.spans = int(self._ask("quit"))
        finally:
            self._proc.wait(timeout=10)


def collector_main() -> None:
    """The collector process: an OTLP/HTTP receiver (its endpoint the first line out),
    then `scrape PORTS` / `stop` (answers the scrapes done) / `quit` (answers the
    spans received) on stdin."""
    with SpanSink() as sink:
        print(sink.endpoint, flush=True)
        scraper: Scraper | None = None
        for line in sys.stdin:
            command, _, arg = line.strip().partition(" ")
            if command == "scrape":
                scraper = Scraper(int(p) for p in arg.split(",") if p)
                scraper.__enter__()
                print("ok", flush=True)
            elif command == "stop" and scraper is not None:
                scraper.__exit__()
                print(scraper.scrapes, flush=True)
                scraper = None
            elif command == "quit":
                print(sink.spans, flush=True)
                return


# What tracing costs depends on how much of it is kept: every trace ("always"), or the
# head-sampled share an operator runs in production ("sampled", the standard variables).
SAMPLED_RATIO = 0.01
MODES: dict[str, dict[str, str]] = {
    "sampled": {
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(SAMPLED_RATIO),
    },
    "always": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
}
OTEL_VARS = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
)


def client_tracer(sink: Collector, mode: str) -> tuple[TracerProvider, RootSpans]:
    """The bench client's own provider (not the global one: "off" rounds trace nothing),
    starting traces as the mount does (`cfs.telemetry.RootSpans`) at the mode's ratio."""
    ratio = SAMPLED_RATIO if mode == "sampled" else 1.0
    provider = TracerProvider(
        resource=Resource.create({"service.name": "bench-client"}),
        sampler=ParentBased(ALWAYS_ON),
    )
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{sink.endpoint}/v1/traces")))
    return provider, RootSpans(provider.get_tracer("bench"), ratio)


def span_or_nothing(roots: RootSpans | None, name: str) -> AbstractContextManager[Any]:
    return roots(name) if roots is not None else contextlib.nullcontext()


def restart_with(
    procs: dict[tuple[str, str], ManagedProcess],
    ports: dict[tuple[str, str], int],
    sink: Collector,
    mode: str,
) -> None:
    """Stop `procs`, set their telemetry environment for `mode` ("off" or one of
    MODES), start them again."""
    for proc in procs.values():
        proc.stop(timeout=15)
    for key, proc in procs.items():
        for var in OTEL_VARS:
            proc.env.pop(var, None)
        proc.env["CFS_METRICS_PORT"] = "0"
        if mode != "off":
            proc.env["CFS_METRICS_PORT"] = str(ports[key])
            proc.env["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink.endpoint
            proc.env.update(MODES[mode])
        proc.start()


async def alternate(
    rounds: int,
    procs: dict[tuple[str, str], ManagedProcess],
    ports: dict[tuple[str, str], int],
    ready: Callable[[], Awaitable[None]],
    measure: Callable[[Any | None], Awaitable[float]],
    other_pids: Iterable[int | None] = (),
) -> dict[str, float]:
    """`rounds` of off, sampled and always-on (the processes restarted into each, the
    endpoints scraped while on); the median throughput of each mode and the ratios.
    `measure(tracer)` runs the workload, tracing its calls with `tracer` unless None.

    On a shared machine the wall clock swings by tens of percent from one run to the
    next; the CPU each unit of work costs (`procs`, `other_pids` such as the NATS
    servers, and this process; not the collector's) does not, so the
    ratio of those (`telemetry_cpu_overhead_ratio`: the throughput a CPU-bound site
    keeps) is given beside the wall-clock one."""
    runs: dict[str, list[float]] = {"off": [], **{mode: [] for mode in MODES}}
    cpu: dict[str, list[float]] = {mode: [] for mode in runs}
    # the same CPU per unit of work split by process role: which process pays for "on"
    by_role: dict[str, list[dict[str, float]]] = {mode: [] for mode in runs}
    others = list(other_pids)

    def roles() -> dict[str, list[int | None]]:
        found: dict[str, list[int | None]] = {"client": [None], "nats": list(others)}
        for (_, service), proc in procs.items():
            found.setdefault(service, []).append(proc.pid)
        return found

    async def timed(mode: str) -> None:
        watched = roles()  # the pids of this mode's processes (restarted into it)
        provider, roots = tracers.get(mode, (None, None))
        before, started = role_cpu_seconds(watched), time.perf_counter()
        rate = await measure(roots)
        elapsed = time.perf_counter() - started
        if provider is not None:
            # The spans this run batched are exported inside its window, not during
            # the next mode's run (the processor would send them up to 5 s later).
            await asyncio.to_thread(provider.force_flush)
        units = rate * elapsed
        rate = units / (time.perf_counter() - started)
        spent = cpu_us_per_op(before, role_cpu_seconds(watched), 1, "cpu")
        runs[mode].append(rate)
        by_role[mode].append({role: us / units for role, us in spent.items()})
        cpu[mode].append(sum(spent.values()) / 1e6 / units)

    with Collector() as sink:
        tracers = {mode: client_tracer(sink, mode) for mode in MODES}
        try:
            modes = list(runs)
            for round_index in range(rounds):
                # Each round starts with another mode: whatever favours the first (or
                # last) run of a round must not favour one mode.
                shift = round_index % len(modes)
                for mode in modes[shift:] + modes[:shift]:
                    await asyncio.to_thread(restart_with, procs, ports, sink, mode)
                    # Scraped on the scraper's own clock from the restart on, as
                    # Prometheus does, not in step with the measured run.
                    scraping = sink.scraping(ports.values()) if mode != "off" else None
                    with scraping or contextlib.nullcontext():
                        await ready()
                        await asyncio.sleep(SETTLE_S)
                        await timed(mode)
                line = "; ".join(
                    f"{mode} {values[-1]:.1f}/s {cpu[mode][-1] * 1e6:.0f} cpu-us ("
                    + ", ".join(
                        f"{r.removeprefix('cpu_')} {us:.0f}" for r, us in by_role[mode][-1].items()
                    )
                    + ")"
                    for mode, values in runs.items()
                )
                print(f"telemetry round {len(runs['off'])}/{rounds}: {line}", file=sys.stderr)
            await asyncio.to_thread(restart_with, procs, ports, sink, "off")
            await ready()
        finally:
            for provider, _ in tracers.values():
                provider.shutdown()
    off = statistics.median(runs["off"])
    cpu_off = statistics.median(cpu["off"])
    return {
        "telemetry_cpu_us_off": cpu_off * 1e6,
        "telemetry_cpu_us_on": statistics.median(cpu["sampled"]) * 1e6,
        "telemetry_cpu_us_always_on": statistics.median(cpu["always"]) * 1e6,
        "telemetry_cpu_overhead_ratio": cpu_off / statistics.median(cpu["sampled"]),
        "telemetry_cpu_overhead_ratio_always_on": cpu_off / statistics.median(cpu["always"]),
        "telemetry_off_per_s": off,
        "telemetry_on_per_s": statistics.median(runs["sampled"]),
        "telemetry_always_on_per_s": statistics.median(runs["always"]),
        "telemetry_overhead_ratio": statistics.median(runs["sampled"]) / off,
        "telemetry_overhead_ratio_always_on": statistics.median(runs["always"]) / off,
        "telemetry_trace_sample_ratio": SAMPLED_RATIO,
        **{
            f"telemetry_{role.replace('-', '_')}_us_{mode}": statistics.median(
                split[role] for split in splits
            )
            for mode, splits in by_role.items()
            for role in splits[0]
        },
        "telemetry_scrapes": sink.scrapes,
        "telemetry_spans_exported": sink.spans,
    }


if __name__ == "__main__" and sys.argv[1:] == ["--collector"]:
    collector_main()
