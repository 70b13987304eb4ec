"""The Nomad runner against a fake Nomad HTTP API on loopback: the requests it makes.

No Nomad runs here; the fake answers what the runner reads (the job's allocations,
the survivor's rendered config, the job's variable) and records everything.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cfs.recovery.natsconf import block, find
from cfs.recovery.plan import Actor, Mode, RecoveryFacts, StepKind, plan_recovery
from cfs.recovery.runners import AUTH_ITEM, SAVED_AUTH_ITEM, NomadRunner, RunnerError

SITE_AUTH = 'authorization {\n  users = [ { nkey: "USITE" } ]\n}\n'
RENDERED = f"""\
server_name: storage-3
listen: 0.0.0.0:4222
http: 0.0.0.0:8222
max_payload: 8MB
jetstream {{ store_dir: /data/jetstream, sync_interval: always }}
cluster {{
  name: local
  listen: 0.0.0.0:6222
  routes: [ nats-route://10.0.0.1:6222 nats-route://10.0.0.2:6222 ]
}}
{SITE_AUTH}"""
ADMISSION = 'authorization {\n  users = [ { nkey: "UADMIN" } ]\n}\n'
CERT = {"DestPath": "secrets/server.pem", "EmbeddedTmpl": '{{ with nomadVar "x" }}{{ end }}'}
# The parts of deploy/nomad/nats.nomad.hcl's job (as the API returns it) the runner reads.
JOB = {
    "ID": "cfs-nats",
    "TaskGroups": [
        {
            "Name": "nats",
            "Tasks": [
                {
                    "Name": "nats-server",
                    "Driver": "docker",
                    "Config": {
                        "image": "nats:2.14-alpine",
                        "network_mode": "host",
                        "args": ["-c", "/local/nats.conf"],
                    },
                    "Templates": [
                        CERT,
                        {"DestPath": "secrets/auth.conf", "EmbeddedTmpl": "{{ .auth_conf }}"},
                        {"DestPath": "local/nats.conf", "EmbeddedTmpl": "server_name: x"},
                    ],
                }
            ],
        }
    ],
}


@dataclass
class FakeNomad:
    requests: list[tuple[str, str, dict[str, str], Any]] = field(default_factory=list)
    allocations: list[dict[str, Any]] = field(default_factory=list)
    items: dict[str, str] = field(default_factory=lambda: {AUTH_ITEM: SITE_AUTH})
    index: int = 41

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, dict(request.query), body))
        assert request.headers.get("X-Nomad-Token") == "tok"
        path = request.path
        if request.method == "GET" and path == "/v1/job/cfs-nats/allocations":
            return web.json_response(self.allocations)
        if request.method == "GET" and path.startswith("/v1/client/fs/cat/"):
            return web.Response(text=RENDERED)
        if request.method == "GET" and path == "/v1/job/cfs-nats":
            return web.json_response(JOB)
        if path == "/v1/var/cfs/local/nats":
            if request.method == "GET":
                return web.json_response({"Items": self.items, "ModifyIndex": self.index})
            if int(request.query["cas"]) != self.index:
                return web.Response(status=409, text="cas conflict")
            assert body is not None
            self.items = dict(body["Items"])
            self.index += 1
            return web.json_response({"Items": self.items, "ModifyIndex": self.index})
        if request.method == "POST" and path in (
            "/v1/jobs",
            "/v1/client/allocation/a-3/restart",
            "/v1/client/allocation/a-3/signal",
        ):
            return web.json_response({})
        if request.method == "DELETE" and path.startswith("/v1/job/cfs-nats-witness-"):
            return web.json_response({})
        return web.Response(status=404, text="unknown")


@pytest.fixture
async def nomad() -> AsyncIterator[tuple[FakeNomad, str]]:
    fake = FakeNomad(
        allocations=[
            {"ID": "a-1", "NodeName": "storage-1", "ClientStatus": "lost"},
            {"ID": "a-3", "NodeName": "storage-3", "ClientStatus": "running"},
        ]
    )
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield fake, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


def _facts(config_text: str) -> RecoveryFacts:
    return RecoveryFacts(
        site="local",
        shards=("001",),
        survivor="storage-3",
        server="storage-3",
        url="nats://10.0.0.3:4222",
        lost_urls=("nats://10.0.0.1:4222", "nats://10.0.0.2:4222"),
        recovery_dir=Path("/tmp/unused"),
        stamp="20260101T000000Z",
        system_password="pw",
        config_text=config_text,
        admission=ADMISSION,
    )


async def test_nomad_runner_restarts_the_survivor_as_seed_and_reopens_it(
    nomad: tuple[FakeNomad, str],
) -> None:
    fake, address = nomad
    runner = NomadRunner(address, site="local", token="tok")
    config = await runner.prepare("storage-3")
    assert config == RENDERED
    plan = plan_recovery(Mode.NOMAD, _facts(config))
    for step in plan.steps:
        if step.actor is Actor.OPERATOR:
            await runner.perform(step, plan)
    calls = [(method, path) for method, path, _, _ in fake.requests]
    assert calls == [
        ("GET", "/v1/job/cfs-nats/allocations"),
        ("GET", "/v1/client/fs/cat/a-3"),
        ("GET", "/v1/job/cfs-nats"),
        ("GET", "/v1/var/cfs/local/nats"),
        ("POST", "/v1/jobs"),  # the witness
        ("PUT", "/v1/var/cfs/local/nats"),  # the seed's overrides
        ("POST", "/v1/client/allocation/a-3/restart"),
        ("DELETE", "/v1/job/cfs-nats-witness-20260101t000000z"),
        ("PUT", "/v1/var/cfs/local/nats"),  # the site's authorization back
        ("POST", "/v1/client/allocation/a-3/signal"),
    ]
    by_call = {(m, p, i): (q, b) for i, (m, p, q, b) in enumerate(fake.requests)}
    assert by_call["GET", "/v1/client/fs/cat/a-3", 1][0] == {"path": "nats-server/local/nats.conf"}
    # The witness runs on the survivor's node with the witness config, admin only.
    job = by_call["POST", "/v1/jobs", 4][1]["Job"]
    assert job["Constraints"][0]["RTarget"] == "storage-3"
    task = job["TaskGroups"][0]["Tasks"][0]
    assert task["Driver"] == "docker" and task["Config"]["image"] == "nats:2.14-alpine"
    assert task["Config"]["args"] == ["-c", "/local/witness.conf"]
    templates = {t["DestPath"]: t["EmbeddedTmpl"] for t in task["Templates"]}
    assert templates["secrets/server.pem"] == CERT["EmbeddedTmpl"]  # the survivor's cert
    assert templates["secrets/auth.conf"] == ADMISSION
    witness_conf = templates["local/witness.conf"]
    assert find(witness_conf, "server_name").scalar == "storage-3-witness"  # type: ignore[union-attr]
    assert block(witness_conf, "authorization") == block(ADMISSION, "authorization")
    # Seed: compare-and-set on the variable; admin only; fresh store; original kept.
    query, body = by_call["PUT", "/v1/var/cfs/local/nats", 5]
    assert query == {"cas": "41"}
    seed = body["Items"][AUTH_ITEM]
    assert block(seed, "authorization") == block(ADMISSION, "authorization")
    assert "/data/jetstream.reseed-20260101T000000Z" in (block(seed, "jetstream") or "")
    assert body["Items"][SAVED_AUTH_ITEM] == SITE_AUTH
    assert by_call["POST", "/v1/client/allocation/a-3/restart", 6][1] == {"TaskName": "nats-server"}
    assert by_call["DELETE", "/v1/job/cfs-nats-witness-20260101t000000z", 7][0] == {"purge": "true"}
    # Open: the site's authorization after the overrides (it wins), then a reload.
    query, body = by_call["PUT", "/v1/var/cfs/local/nats", 8]
    assert query == {"cas": "42"}
    opened = body["Items"][AUTH_ITEM]
    assert block(opened, "authorization") == block(SITE_AUTH, "authorization")
    assert find(block(opened, "cluster") or "", "name").scalar == plan.new_cluster  # type: ignore[union-attr]
    assert by_call["POST", "/v1/client/allocation/a-3/signal", 9][1] == {
        "Task": "nats-server",
        "Signal": "SIGHUP",
    }
    assert json.dumps(plan.document())  # the plan is JSON


async def test_nomad_runner_errors_name_the_problem(nomad: tuple[FakeNomad, str]) -> None:
    fake, address = nomad
    with pytest.raises(RunnerError, match="no running allocation on node 'storage-9'"):
        await NomadRunner(address, site="local", token="tok").prepare("storage-9")
    runner = NomadRunner(address, site="local", token="tok")
    await runner.prepare("storage-3")
    plan = plan_recovery(Mode.NOMAD, _facts(RENDERED))
    fake.index = 99  # someone else changed the variable meanwhile: compare-and-set refuses
    seed = next(s for s in plan.steps if s.kind is StepKind.START_SEED)
    with pytest.raises(RunnerError, match="409 cas conflict"):
        await runner.perform(seed, plan)
    with pytest.raises(RunnerError, match=re.escape("Nomad GET http://127.0.0.1:1/")):
        await NomadRunner("http://127.0.0.1:1", site="local", token="tok").prepare("storage-3")
