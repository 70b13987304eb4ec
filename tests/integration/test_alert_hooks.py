"""Alert hooks against real receivers: a webhook on a loopback HTTP server gets the
alert as JSON once; a hanging webhook delays nothing else and its failure is counted;
a failing one is retried within its deadline; a command gets valid JSON on stdin."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cfs_alerts.hooks import Dispatcher, build, document
from cfs_alerts.rules import HookSpec, Rule, observe

pytestmark = pytest.mark.expected_logs("alert.hook_failed", "retry.*")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Receiver:
    """A loopback HTTP server; `got`: (path, JSON body, monotonic time) per POST."""

    def __init__(self) -> None:
        self.got: list[tuple[str, Any, float]] = []
        self.routes: dict[str, Handler] = {}
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.got.append((request.path, await request.json(), time.monotonic()))
        special = self.routes.get(request.path)
        return await special(request) if special else web.Response(status=204)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got = Receiver()
    app = web.Application()
    app.router.add_post("/{path:.*}", got.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    got.url = f"http://127.0.0.1:{port}"
    try:
        yield got
    finally:
        await runner.cleanup()


def alert() -> dict[str, Any]:
    rule = Rule.model_validate(
        {"name": "node-down", "figure": "node.down", "above": 0, "severity": "critical",
         "summary": "node {key} down", "labels": {"team": "storage"}}
    )  # fmt: skip
    _, note = observe(rule, "storage-2", True, 1.0, None, 100.0)
    assert note is not None
    return document(note, "site-a")


async def test_a_webhook_gets_the_alert_once(receiver: Receiver) -> None:
    hook = build(HookSpec(name="ops", kind="webhook", url=f"{receiver.url}/ops"))
    dispatcher = Dispatcher([hook])
    dispatcher.notify(alert())
    await dispatcher.close()
    assert [(p, body["summary"], body["status"]) for p, body, _ in receiver.got] == [
        ("/ops", "node storage-2 down", "firing")
    ]
    body = receiver.got[0][1]
    assert body["labels"] == {"team": "storage"} and body["severity"] == "critical"
    assert dispatcher.delivered["ops"] == 1 and not dispatcher.failed


async def test_a_hanging_webhook_delays_no_other_and_its_failure_is_counted(
    receiver: Receiver,
) -> None:
    async def hang(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(3)  # past the hook's 1 s timeout
        return web.Response(status=204)

    receiver.routes["/slow"] = hang
    slow = build(
        HookSpec(name="slow", kind="webhook", url=f"{receiver.url}/slow", timeout_s=1, deadline_s=1)
    )
    fast = build(HookSpec(name="fast", kind="webhook", url=f"{receiver.url}/fast"))
    dispatcher = Dispatcher([slow, fast])
    started = time.monotonic()
    dispatcher.notify(alert())  # returns at once
    assert time.monotonic() - started < 0.1 and dispatcher.pending == 2
    await dispatcher.close(timeout_s=10)
    arrived = {path: at - started for path, _, at in receiver.got}
    assert arrived["/fast"] < 1.0, arrived
    assert dispatcher.delivered["fast"] == 1 and dispatcher.failed["slow"] == 1
    assert "TimeoutError" in dispatcher.last_error["slow"]


async def test_a_failing_webhook_is_retried_within_its_deadline(receiver: Receiver) -> None:
    async def refuse(_: web.Request) -> web.StreamResponse:
        return web.Response(status=503)

    receiver.routes["/down"] = refuse
    hook = build(HookSpec(name="down", kind="webhook", url=f"{receiver.url}/down", deadline_s=2))
    dispatcher = Dispatcher([hook])
    dispatcher.notify(alert())
    await dispatcher.close(timeout_s=10)
    assert len(receiver.got) >= 2, "tried again"
    assert dispatcher.failed["down"] == 1 and "HTTP 503" in dispatcher.last_error["down"]


async def test_a_command_gets_the_alert_as_json_on_stdin(tmp_path: Path) -> None:
    out = tmp_path / "alert.json"
    script = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps(json.load(sys.stdin)))"
    ok = build(HookSpec(name="cmd", kind="command", argv=[sys.executable, "-c", script]))
    bad = build(HookSpec(name="bad", kind="command", argv=[sys.executable, "-c", "exit(3)"]))
    dispatcher = Dispatcher([ok, bad])
    dispatcher.notify(alert())
    await dispatcher.close()
    assert json.loads(out.read_text())["rule"] == "node-down"
    assert dispatcher.failed["bad"] == 1 and "exited 3" in dispatcher.last_error["bad"]
