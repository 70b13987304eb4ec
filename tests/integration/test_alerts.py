"""The alerts service with real processes: a node killed past the rule's `for:` time
sends exactly one webhook to a real HTTP receiver, and its return exactly one
resolution; both are AlertRaised / AlertResolved events on ALERTS; `cfs admin alerts
list` shows what fires; `cfs admin alerts test` goes through every hook."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from cfs.supervisor import LocalSite
from cfs_contracts import REGISTRY
from cfs_contracts.events.ops import AlertRaised, AlertResolved
from cfs_contracts.streams import ALERTS
from tests.integration.test_replication_link import admin

pytestmark = [
    pytest.mark.timeout(240),
    # the killed node: its peers' SWIM and leases notice; the alert itself is INFO
    pytest.mark.expected_logs("member.*", "lease.*", "singleton.*", "nats.*", "health.*"),
]


class Receiver(ThreadingHTTPServer):
    """A loopback webhook receiver: every POSTed JSON body, in order."""

    def __init__(self) -> None:
        got: list[dict[str, Any]] = []
        self.got = got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                got.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver) -> Iterator[LocalSite]:
    base = tmp_path_factory.mktemp("alerts")
    rules = base / "rules.yaml"
    out = base / "command-hook.json"
    script = (
        f"import json, sys; open({str(out)!r}, 'a').write(json.dumps(json.load(sys.stdin)) + '\\n')"
    )
    rules.write_text(
        yaml.safe_dump(
            {
                "rules": [
                    {"name": "node-down", "figure": "node.down", "above": 0, "for": "3s",
                     "severity": "critical", "summary": "node {key} down"},
                    {"name": "corruption-detected", "event": "CorruptionDetected"},
                ],
                "hooks": [
                    {"name": "ops", "kind": "webhook", "url": receiver.url, "timeout_s": 5},
                    {"name": "script", "kind": "command", "argv": [sys.executable, "-c", script]},
                ],
            }
        )
    )  # fmt: skip
    local = LocalSite(
        base / "site",
        nodes=3,
        services=("membership", "alerts"),
        env={"CFS_RULES_FILE": str(rules), "CFS_EVERY_S": "0.5"},
    )
    asyncio.run(local.start())
    try:
        asyncio.run(local.wait_ready())
        yield local
    finally:
        local.stop()


def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.3)
    return found


def listed(site: LocalSite) -> dict[str, Any] | None:
    done = admin(site, "alerts", "list", "--json")
    return json.loads(done.stdout) if done.returncode == 0 else None


async def _alert_events(site: LocalSite) -> list[AlertRaised | AlertResolved]:
    async with await site.client() as bus:
        info = await bus.js.stream_info(ALERTS.name)
        found: list[AlertRaised | AlertResolved] = []
        for seq in range(info.state.first_seq or 1, info.state.last_seq + 1):
            msg = await bus.js.get_msg(ALERTS.name, seq, direct=True)
            payload = REGISTRY.decode(msg.data or b"").payload
            if isinstance(payload, AlertRaised | AlertResolved):
                found.append(payload)
        return found


def test_a_node_down_past_for_fires_once_and_resolves_once(
    site: LocalSite, receiver: Receiver
) -> None:
    state = until(lambda: listed(site), 60, "the alerts service's first state")
    assert {r["name"] for r in state["rules"]} == {"node-down", "corruption-detected"}
    assert state["firing"] == []

    site.kill9("storage-3")
    killed = time.monotonic()
    firing = until(lambda: [a for a in receiver.got if a["rule"] == "node-down"], 90, "the webhook")
    assert firing[0]["status"] == "firing" and firing[0]["key"] == "storage-3", firing
    assert firing[0]["summary"] == "node storage-3 down" and firing[0]["site"] == site.site
    assert time.monotonic() - killed >= 3.0
    shown = until(lambda: (listed(site) or {}).get("firing"), 30, "alerts list shows it")
    assert [(a["rule"], a["key"]) for a in shown] == [("node-down", "storage-3")]
    time.sleep(3.0)  # more rounds: no second notification while it keeps firing
    assert len([a for a in receiver.got if a["rule"] == "node-down"]) == 1

    site.start_node("storage-3")
    until(lambda: [a for a in receiver.got if a["status"] == "resolved"], 90, "the resolution")
    time.sleep(2.0)
    about = [(a["rule"], a["key"], a["status"]) for a in receiver.got if a["rule"] == "node-down"]
    assert about == [("node-down", "storage-3", "firing"), ("node-down", "storage-3", "resolved")]
    events = asyncio.run(_alert_events(site))
    assert [type(e).__name__ for e in events if e.rule == "node-down"] == [
        "AlertRaised",
        "AlertResolved",
    ]
    hooks = {h["name"]: h for h in (listed(site) or {})["hooks"]}
    assert hooks["ops"]["delivered"] == 2 and hooks["script"]["delivered"] == 2, hooks


def test_alerts_test_goes_through_every_hook(site: LocalSite, receiver: Receiver) -> None:
    before = len(receiver.got)
    done = admin(site, "alerts", "test", "corruption-detected")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ops delivered" in done.stdout and "script delivered" in done.stdout
    sent = receiver.got[before:]
    assert len(sent) == 1 and sent[0]["test"] is True and sent[0]["summary"].startswith("TEST")
    unknown = admin(site, "alerts", "test", "no-such-rule")
    assert unknown.returncode == 2 and "no rule 'no-such-rule'" in unknown.stderr
