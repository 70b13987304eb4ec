"""A fault-injecting HTTP proxy in front of the S3 server, for tests and drills.

    python -m cfs.supervisor.s3proxy --port P --upstream http://127.0.0.1:Q

Services are pointed at the proxy instead of moto; the test then decides what S3
"does" without touching the services: answer slowly, answer 500/503/403 with an
S3 error body, or cut the connection halfway through a response body (an upload:
before the server has its body, so nothing is stored). "Stopped"
is the proxy process stopped (`S3FaultProxy.stop`): connections are refused on a
port that stays the same. The fault is set through the proxy itself
(`GET /_cfs/fault?mode=...`), so a running process changes behaviour at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import urlencode

from cfs.logs import setup_logging
from cfs.supervisor._http import http_get
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.ports import free_port
from cfs.supervisor.process import ManagedProcess, log_event

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
CONTROL_PATH = "/_cfs/fault"
MODES = ("pass", "slow", "status", "cut")
_S3_CODES = {403: "AccessDenied", 500: "InternalError", 503: "SlowDown"}
# Not forwarded: they describe one hop, not the message (RFC 9110 §7.6.1).
_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
}


@dataclass
class Fault:
    mode: str = "pass"
    delay_s: float = 0.0  # slow: before forwarding
    status: int = 503  # status: the answer
    methods: list[str] = field(default_factory=list)  # empty: every method
    buckets: list[str] = field(default_factory=list)  # empty: every bucket (path style)

    def applies(self, method: str, path: str = "/") -> bool:
        bucket = path.lstrip("/").split("/", 1)[0]
        return (
            self.mode != "pass"
            and (not self.methods or method in self.methods)
            and (not self.buckets or bucket in self.buckets)
        )

    @classmethod
    def parse(cls, query: dict[str, str]) -> Fault:
        mode = query.get("mode", "pass")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(MODES)}")
        status = int(query.get("status", "503"))
        if status not in _S3_CODES:
            raise ValueError(f"status {status}: one of {sorted(_S3_CODES)}")
        methods = [m for m in query.get("methods", "").upper().split(",") if m]
        buckets = [b for b in query.get("buckets", "").split(",") if b]
        return cls(mode, float(query.get("delay_s", "0")), status, methods, buckets)


def _error_body(status: int) -> bytes:
    code = _S3_CODES[status]
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>injected by the cfs S3 fault proxy"
        "</Message><RequestId>cfs-s3proxy</RequestId></Error>"
    ).encode()


async def serve(port: int, upstream: str) -> None:
    """Run the proxy until cancelled (aiohttp: already a dependency, via aiobotocore)."""
    from aiohttp import ClientSession, ClientTimeout, web

    fault = Fault()
    session = ClientSession(timeout=ClientTimeout(total=300), auto_decompress=False)

    async def control(request: web.Request) -> web.Response:
        nonlocal fault
        try:
            fault = Fault.parse(dict(request.query))
        except ValueError as exc:
            return web.Response(status=400, text=str(exc))
        log_event(log, logging.INFO, "s3proxy.fault", **asdict(fault))
        return web.json_response(asdict(fault))

    async def forward(request: web.Request) -> web.StreamResponse:
        current = fault
        hit = current.applies(request.method, request.path)
        if hit:
            if current.mode == "cut" and request.can_read_body:
                await request.content.read(1)  # an upload dropped mid-body: never stored
                if request.transport is not None:
                    request.transport.abort()
                return web.Response(status=500)  # not sent: the connection is gone
            if current.mode == "slow":
                await asyncio.sleep(current.delay_s)
            elif current.mode == "status":
                await request.read()
                return web.Response(
                    status=current.status,
                    body=_error_body(current.status),
                    content_type="application/xml",
                )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with session.request(
            request.method,
            f"{upstream}{request.rel_url}",
            headers=headers,  # Host kept: the request was signed for the proxy's address
            data=await request.read(),
            allow_redirects=False,
        ) as answer:
            body = await answer.read()
            reply = web.StreamResponse(status=answer.status, reason=answer.reason)
            for name, value in answer.headers.items():
                if name.lower() not in _HOP_BY_HOP:
                    reply.headers.add(name, value)
            await reply.prepare(request)
            if hit and current.mode == "cut" and body:
                await reply.write(body[: len(body) // 2])
                if request.transport is not None:
                    request.transport.abort()  # mid-body, as a dropped connection
                return reply
            if request.method != "HEAD":
                await reply.write(body)
            await reply.write_eof()
            return reply

    app = web.Application(client_max_size=1024**3)
    app.router.add_get(CONTROL_PATH, control)
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    log_event(log, logging.INFO, "s3proxy.listening", port=port, upstream=upstream)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        await session.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cfs.supervisor.s3proxy")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="http://host:port of the S3 server")
    args = parser.parse_args(argv)
    setup_logging("INFO", service="s3proxy")
    # A cut connection is this proxy's doing: aiohttp's report of the handler's answer
    # going nowhere ("Cannot write to closing transport") is not an error here.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.upstream.rstrip("/")))


class S3FaultProxy:
    """The proxy as a child process on a fixed port (it survives stop/start)."""

    def __init__(self, state_dir: Path, upstream: str, *, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.upstream = upstream
        self.port = port if port is not None else free_port(HOST)
        self.process = ManagedProcess(
            "s3proxy",
            [sys.executable, "-m", "cfs.supervisor.s3proxy", "--port", str(self.port),
             "--upstream", upstream],
            log_path=self.state_dir / "s3proxy.log",
            cwd=self.state_dir,
        )  # fmt: skip

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def running(self) -> bool:
        return self.process.running

    def start(self, timeout: float = 30.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.process.start()
        self.process.wait_until(
            lambda: http_get(f"{self.endpoint_url}{CONTROL_PATH}?mode=pass")[0] == 200,
            timeout,
            f"the S3 fault proxy on {self.endpoint_url}",
        )

    def set_fault(
        self,
        mode: str,
        *,
        delay_s: float = 0.0,
        status: int = 503,
        methods: tuple[str, ...] = (),
        buckets: tuple[str, ...] = (),
    ) -> None:
        """`pass`, `slow` (delay_s), `status` (403/500/503) or `cut`, for `methods` on
        `buckets` (each default: all)."""
        query = urlencode(
            {
                "mode": mode,
                "delay_s": delay_s,
                "status": status,
                "methods": ",".join(methods),
                "buckets": ",".join(buckets),
            }
        )
        code, body = http_get(f"{self.endpoint_url}{CONTROL_PATH}?{query}")
        if code != 200:
            raise SupervisorError(f"S3 fault proxy refused {query}: {code} {body!r}")
        log_event(log, logging.INFO, "s3proxy.set", **json.loads(body))

    def stop(self, timeout: float = 10.0) -> int | None:
        return self.process.stop(timeout)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    main()
