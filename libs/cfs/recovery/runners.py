"""Who performs a quorum recovery's operator steps (`cfs.recovery.plan`): thin runners.

- `DevRunner`: the `cfs dev` supervisor's control socket (`reform-nats`, `open-nats`).
- `ManualRunner`: a person. The steps and their exact commands are printed; the
  command's own waits that follow notice when they are done.
- `NomadRunner`: the Nomad HTTP API (`--nomad ADDR`, token from `NOMAD_TOKEN`), for the
  `cfs-nats` job of `deploy/nomad/nats.nomad.hcl`: its `local/nats.conf` ends by
  including `secrets/auth.conf`, rendered from the item `auth_conf` of the variable
  `cfs/<site>/nats` (re-rendered with SIGHUP on a change). The runner reads the
  survivor's rendered config through the allocation's file system API and the job's
  spec (driver, image, TLS templates), runs the witness as a job of its own pinned to
  the survivor's node (same image and certificates, the admin-only authorization), puts
  the seed overrides (new cluster name, fresh store dir, system user, admin-only
  authorization) into `auth_conf` (compare-and-set; the original kept in
  `cfs_recovery_auth_conf`), restarts the survivor's task (a reload cannot change the
  store or the cluster name), purges the witness job, and at the end puts the site's
  authorization back after the overrides and signals the task (SIGHUP: a restart of the
  lone seed would wait for a route to the gone witness).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any, Protocol

import aiohttp

from cfs.recovery.plan import RecoveryPlan, Step, StepKind
from cfs.recovery.streams import RecoveryError
from cfs.supervisor.devcontrol import DevControl
from cfs.supervisor.errors import SupervisorError

log = logging.getLogger(__name__)

NOMAD_TIMEOUT_S = 15.0
AUTH_ITEM = "auth_conf"
SAVED_AUTH_ITEM = "cfs_recovery_auth_conf"


class RunnerError(RecoveryError):
    """A runner could not perform a step; the message says which and why."""


class Runner(Protocol):
    name: str
    prints_commands: bool  # the steps' shell lines are for a person

    async def perform(self, step: Step, plan: RecoveryPlan) -> dict[str, Any]:
        """Do an operator step (or hand it to whoever does); `nats_urls`/`old_store`
        in the result when they changed."""
        ...


class ManualRunner:
    """The operator does the steps; the command prints them and its waits follow."""

    name = "manual: the operator restarts the NATS server"
    prints_commands = True

    async def perform(self, step: Step, plan: RecoveryPlan) -> dict[str, Any]:
        return {}


class DevRunner:
    """Today's behaviour: the dev supervisor reforms and reopens its NATS cluster."""

    name = "the cfs dev supervisor"
    prints_commands = False

    def __init__(self, control: DevControl) -> None:
        self.control = control

    async def perform(self, step: Step, plan: RecoveryPlan) -> dict[str, Any]:
        facts = plan.facts
        try:
            if step.kind is StepKind.REFORM:
                reformed: dict[str, Any] = await asyncio.to_thread(
                    self.control.call,
                    "reform-nats",
                    node=facts.survivor,
                    site=facts.site,
                    timeout=120.0,
                )
                return reformed
            if step.kind is StepKind.OPEN:
                opened: dict[str, Any] = await asyncio.to_thread(
                    self.control.call, "open-nats", site=facts.site, timeout=60.0
                )
                return opened
        except SupervisorError as exc:
            raise RunnerError(f"{step.kind.value}: {exc}") from exc
        raise RunnerError(f"the dev supervisor has no step {step.kind.value}")


class NomadRunner:
    """The Nomad HTTP API restarts, reconfigures and signals the survivor's NATS task."""

    prints_commands = False

    def __init__(
        self,
        address: str,
        *,
        site: str,
        job: str = "cfs-nats",
        task: str = "nats-server",
        config_path: str = "local/nats.conf",
        token: str | None = None,
    ) -> None:
        self.address = address.rstrip("/")
        self.job = job
        self.task = task
        self.config_path = config_path
        self.var_path = f"cfs/{site}/nats"
        self.token = token if token is not None else os.environ.get("NOMAD_TOKEN")
        self.name = f"Nomad at {self.address}, job {job}"
        self.alloc_id: str | None = None
        self.items: dict[str, str] = {}
        self.var_index = 0
        self.task_spec: dict[str, Any] = {}  # the survivor's task in the job: driver, config

    def witness_job_id(self, plan: RecoveryPlan) -> str:
        return f"{self.job}-witness-{plan.facts.stamp.lower()}"

    async def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        headers = {"X-Nomad-Token": self.token} if self.token else {}
        url = f"{self.address}{path}"
        try:
            async with (
                aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=NOMAD_TIMEOUT_S)
                ) as session,
                session.request(method, url, json=body, params=params, headers=headers) as reply,
            ):
                text = await reply.text()
                if reply.status >= 300:
                    raise RunnerError(f"Nomad {method} {path}: {reply.status} {text.strip()[:200]}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RunnerError(f"Nomad {method} {url}: {exc or type(exc).__name__}") from None
        log.info("nomad.call", extra={"method": method, "path": path, "status": reply.status})
        if not text:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return text

    async def prepare(self, survivor: str) -> str:
        """Find the survivor's running allocation and read its rendered config and the
        job's variable; returns the config text (the plan is made from it)."""
        allocs = await self._call("GET", f"/v1/job/{self.job}/allocations")
        running = [
            a
            for a in allocs or []
            if a.get("NodeName") == survivor and a.get("ClientStatus") == "running"
        ]
        if not running:
            raise RunnerError(
                f"Nomad job {self.job} has no running allocation on node {survivor!r}"
            )
        self.alloc_id = str(running[0]["ID"])
        text = await self._call(
            "GET",
            f"/v1/client/fs/cat/{self.alloc_id}",
            params={"path": f"{self.task}/{self.config_path}"},
        )
        spec = await self._call("GET", f"/v1/job/{self.job}")
        tasks = [t for g in (spec or {}).get("TaskGroups") or [] for t in g.get("Tasks") or []]
        self.task_spec = next((t for t in tasks if t.get("Name") == self.task), {})
        variable = await self._call("GET", f"/v1/var/{self.var_path}")
        self.items = dict((variable or {}).get("Items") or {})
        self.var_index = int((variable or {}).get("ModifyIndex") or 0)
        return str(text)

    async def perform(self, step: Step, plan: RecoveryPlan) -> dict[str, Any]:
        if self.alloc_id is None:
            raise RunnerError("NomadRunner.prepare was not called")
        kind = step.kind
        if kind is StepKind.START_WITNESS:
            await self._call("POST", "/v1/jobs", {"Job": self._witness_job(plan)})
        elif kind is StepKind.START_SEED:
            original = self.items.get(SAVED_AUTH_ITEM, self.items.get(AUTH_ITEM, ""))
            await self._put_items(
                {AUTH_ITEM: plan.files["seed-overrides.conf"], SAVED_AUTH_ITEM: original}
            )
            await self._call(
                "POST", f"/v1/client/allocation/{self.alloc_id}/restart", {"TaskName": self.task}
            )
        elif kind is StepKind.STOP_WITNESS:
            await self._call(
                "DELETE", f"/v1/job/{self.witness_job_id(plan)}", params={"purge": "true"}
            )
        elif kind is StepKind.OPEN:
            original = self.items.get(SAVED_AUTH_ITEM, "")
            await self._put_items({AUTH_ITEM: plan.files["open-overrides.conf"] + "\n" + original})
            await self._call(
                "POST",
                f"/v1/client/allocation/{self.alloc_id}/signal",
                {"Task": self.task, "Signal": "SIGHUP"},
            )
        elif kind is StepKind.KEEP_CONFIG:
            pass
        else:
            raise RunnerError(f"the Nomad runner has no step {kind.value}")
        return {"old_store": plan.old_store} if kind is StepKind.START_SEED else {}

    async def _put_items(self, changes: dict[str, str]) -> None:
        items = {**self.items, **changes}
        answer = await self._call(
            "PUT",
            f"/v1/var/{self.var_path}",
            {"Path": self.var_path, "Items": items},
            params={"cas": str(self.var_index)},
        )
        self.items = items
        if isinstance(answer, dict) and answer.get("ModifyIndex") is not None:
            self.var_index = int(answer["ModifyIndex"])

    def _witness_job(self, plan: RecoveryPlan) -> dict[str, Any]:
        """The survivor's task again (its driver, image and certificate templates) with
        the witness's config and the admin-only authorization, pinned to its node."""
        job_id = self.witness_job_id(plan)
        config = dict(self.task_spec.get("Config") or {"command": "nats-server"})
        config["args"] = ["-c", "/local/witness.conf"]
        templates = [
            t
            for t in self.task_spec.get("Templates") or []
            if str(t.get("DestPath", "")).startswith("secrets/")
            and t.get("DestPath") != "secrets/auth.conf"
        ]
        templates += [
            _static("secrets/auth.conf", plan.facts.admission or ""),
            _static("local/witness.conf", plan.files["witness.conf"]),
        ]
        return {
            "ID": job_id,
            "Name": job_id,
            "Type": "service",
            "Datacenters": ["*"],
            "Constraints": [
                {
                    "LTarget": "${node.unique.name}",
                    "RTarget": plan.facts.survivor,
                    "Operand": "=",
                }
            ],
            "TaskGroups": [
                {
                    "Name": "witness",
                    "Count": 1,
                    "RestartPolicy": {"Attempts": 0, "Mode": "fail"},
                    "ReschedulePolicy": {"Attempts": 0, "Unlimited": False},
                    "Tasks": [
                        {
                            "Name": "nats-server",
                            "Driver": self.task_spec.get("Driver", "exec"),
                            "Config": config,
                            "Templates": templates,
                        }
                    ],
                }
            ],
        }


def _static(dest: str, text: str) -> dict[str, Any]:
    """A template that renders `text` as it is (delimiters nothing in it uses)."""
    return {
        "DestPath": dest,
        "EmbeddedTmpl": text,
        "ChangeMode": "noop",
        "LeftDelim": "[[cfs[[",
        "RightDelim": "]]cfs]]",
        "Perms": "0600",
    }
