"""What a quorum recovery must do, step by step, as data (pure: no I/O).

`cfs admin raft-force-leader` without a quorum re-seeds the site from its survivor
(`cfs.recovery.quorum`). Which NATS server is restarted, how, and by whom depends on
the deployment; the steps and their reasons do not. So one function builds the plan
from facts (`RecoveryFacts`), and thin runners (`cfs.recovery.runners`) perform its
operator steps: the `cfs dev` supervisor, a person reading the printed steps, or the
Nomad API. The steps marked `cfs` the command performs itself (export, the waits, the
witness's removal, the import, the lease hand-over).

Invariants every mode keeps (and the unit tests check):
- the export is complete on local disk before the survivor's store is touched;
- the survivor's old store is moved (or left) aside, never deleted;
- the seed admits the recovery admin only until the import is complete, so no service
  sees a half-imported stream or writes into an empty one;
- a lost server that comes back is refused: the new cluster has a new name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from cfs.recovery.natsconf import (
    NatsConfigError,
    ServerConfig,
    accounts_with_system_user,
    cluster_override,
    find,
    quote,
    read_server_config,
    rewrite_block,
)

SYSTEM_USER = "cfs-recovery-sys"
WITNESS_PORT = 6299
HOST = "127.0.0.1"  # the witness's client port: nobody connects to it


class Mode(StrEnum):
    DEV = "dev"  # the `cfs dev` supervisor's control socket does the server steps
    MANUAL = "manual"  # the operator does them; the command prints and waits
    NOMAD = "nomad"  # the Nomad HTTP API does them


class Actor(StrEnum):
    CFS = "cfs"  # this command
    OPERATOR = "operator"  # the runner: the dev supervisor, Nomad, or a person


class StepKind(StrEnum):
    EXPORT = "export"
    REFORM = "reform"  # dev: stop, move store, seed + witness, remove witness in one call
    STOP_SERVER = "stop-server"
    STOP_SERVICES = "stop-services"  # a site without NATS authorization: nothing keeps them out
    MOVE_STORE = "move-store"
    START_SEED = "start-seed"
    START_WITNESS = "start-witness"
    WAIT_SEED = "wait-seed"
    REMOVE_WITNESS = "remove-witness"
    STOP_WITNESS = "stop-witness"
    WAIT_ALONE = "wait-alone"
    IMPORT = "import"
    OPEN = "open"
    START_SERVICES = "start-services"
    WAIT_OPEN = "wait-open"
    HAND_LEASES = "hand-leases"
    KEEP_CONFIG = "keep-config"  # afterwards: nothing to wait for


@dataclass(frozen=True)
class Step:
    kind: StepKind
    actor: Actor
    action: str  # one line: what happens
    reason: str  # one line: why
    commands: tuple[str, ...] = ()  # exact shell lines for a person (manual mode)


@dataclass(frozen=True)
class RecoveryFacts:
    """What is known when the plan is made (gathered by the command)."""

    site: str
    shards: tuple[str, ...]  # shards without a quorum
    survivor: str  # the node that leads afterwards
    server: str  # its NATS server's name (the one that still answers)
    url: str  # that server's client URL
    lost_urls: tuple[str, ...]  # the site's other URLs (not answering)
    recovery_dir: Path
    stamp: str  # UTC, `%Y%m%dT%H%M%SZ`: names the new cluster and the old store
    system_password: str = field(repr=False)
    config_file: PurePosixPath | None = None  # the survivor's config, where it runs
    config_text: str | None = None  # its text (manual: read from the file; Nomad: fetched)
    store_dir: str | None = None  # its JetStream store (else read from the config)
    admission: str | None = None  # `authorization { ... }` admitting the admin only
    witness_port: int = WITNESS_PORT


@dataclass(frozen=True)
class RecoveryPlan:
    mode: Mode
    facts: RecoveryFacts
    steps: tuple[Step, ...]
    new_cluster: str | None = None
    witness: str | None = None
    old_store: str | None = None
    new_store: str | None = None  # Nomad: the seed's fresh store (the old one stays put)
    files: dict[str, str] = field(default_factory=dict, repr=False)  # name -> text

    @property
    def export_dir(self) -> Path:
        return self.facts.recovery_dir / "export"

    @property
    def files_dir(self) -> Path:
        return self.facts.recovery_dir / "nats"

    def document(self) -> dict[str, Any]:
        """The plan as JSON (`plan.json` in the recovery directory); no password."""
        return {
            "mode": self.mode.value,
            "site": self.facts.site,
            "survivor": self.facts.survivor,
            "server": self.facts.server,
            "url": self.facts.url,
            "lost_urls": list(self.facts.lost_urls),
            "shards": list(self.facts.shards),
            "new_cluster": self.new_cluster,
            "witness": self.witness,
            "old_store": self.old_store,
            "new_store": self.new_store,
            "files": sorted(self.files),
            "steps": [
                {**asdict(step), "kind": step.kind.value, "actor": step.actor.value}
                for step in self.steps
            ],
        }


def decide_mode(dev_supervisor: bool, nomad: str | None) -> Mode:
    """`--nomad` wins; else the dev supervisor when one runs; else the operator."""
    if nomad:
        return Mode.NOMAD
    return Mode.DEV if dev_supervisor else Mode.MANUAL


def plan_recovery(mode: Mode, facts: RecoveryFacts) -> RecoveryPlan:
    """The steps for `mode`; NatsConfigError when the survivor's config is needed and
    cannot be read for what must change."""
    if mode is Mode.DEV:
        return _dev_plan(facts)
    if facts.config_text is None:
        raise NatsConfigError(
            f"the config of NATS server {facts.server} is needed to write its recovery "
            "config (--nats-config FILE)"
        )
    config = read_server_config(facts.config_text)
    if config.server_name is not None and config.server_name != facts.server:
        raise NatsConfigError(
            f"the config names server {config.server_name!r}, but the survivor's NATS "
            f"server is {facts.server!r}"
        )
    store = facts.store_dir or config.store_dir
    if store is None:
        raise NatsConfigError(
            f"no jetstream store_dir in the config of {facts.server} (--nats-store DIR)"
        )
    old_name = find(config.cluster_body, "name")
    new_cluster = f"{old_name.scalar if old_name else facts.site}-r{facts.stamp}"
    if mode is Mode.MANUAL:
        return _manual_plan(facts, config, store, new_cluster)
    return _nomad_plan(facts, config, store, new_cluster)


# -- the modes -----------------------------------------------------------------------------
def _export(facts: RecoveryFacts) -> Step:
    return Step(
        StepKind.EXPORT,
        Actor.CFS,
        f"export every stream of site {facts.site} from {facts.server} ({facts.url}) by "
        f"direct get into {facts.recovery_dir / 'export'}",
        "the survivor still answers direct gets without a quorum; this copy, fsync'd with "
        "a checksum per stream, is what the fresh cluster is seeded from",
    )


def _import(facts: RecoveryFacts) -> Step:
    return Step(
        StepKind.IMPORT,
        Actor.CFS,
        f"import the export into {facts.server} at R1, in order",
        "journals keep every sequence number and event id, so the survivor's metadata "
        "projections stay valid; the server refuses a copy that would shift",
    )


def _hand_leases(facts: RecoveryFacts) -> Step:
    return Step(
        StepKind.HAND_LEASES,
        Actor.CFS,
        f"hand the writer lease of shard(s) {', '.join(facts.shards)} to {facts.survivor}",
        "the imported leases still name lost holders; the survivor takes them at once",
    )


def _dev_plan(facts: RecoveryFacts) -> RecoveryPlan:
    steps = (
        _export(facts),
        Step(
            StepKind.REFORM,
            Actor.OPERATOR,
            f"the dev supervisor re-forms {facts.server} as the seed of a fresh cluster "
            "(old store moved aside), admitting the recovery admin only",
            "JetStream has no 'force new cluster': a fresh store on the survivor, in a "
            "cluster of a new name, is seeded from the export",
        ),
        _import(facts),
        Step(
            StepKind.OPEN,
            Actor.OPERATOR,
            "the dev supervisor admits the site's services again",
            "the streams are complete",
        ),
        _hand_leases(facts),
    )
    return RecoveryPlan(Mode.DEV, facts, steps)


def _witness_name(facts: RecoveryFacts) -> str:
    return f"{facts.server}-witness"


def _route_host(facts: RecoveryFacts) -> str:
    """The witness runs on the survivor's host; routes between them use the address its
    clients use, which its TLS certificate names (loopback may not be in it)."""
    return urlsplit(facts.url if "://" in facts.url else f"nats://{facts.url}").hostname or HOST


def _seed_overrides(
    facts: RecoveryFacts, config: ServerConfig, new_cluster: str, *, admission: bool
) -> list[str]:
    # Closed: routes to the witness only (the pair elects). Open: to itself, which a
    # server ignores, and which servers added later with the same overrides (Nomad
    # renders them into every allocation) dial to join the new cluster.
    host = _route_host(facts)
    route = f"nats://{host}:{facts.witness_port if admission else config.cluster_port}"
    parts = [
        cluster_override(config, new_cluster, [route]),
        accounts_with_system_user(config.accounts_body, SYSTEM_USER, facts.system_password),
    ]
    if admission and facts.admission is not None:
        parts.append(facts.admission.strip())
    return parts


def _witness_overrides(
    facts: RecoveryFacts, config: ServerConfig, new_cluster: str, store: str, pid_file: str | None
) -> list[str]:
    seed_route = f"nats://{_route_host(facts)}:{config.cluster_port}"
    cluster = rewrite_block(
        config.cluster_body,
        {
            "name": quote(new_cluster),
            "listen": quote(f"{_route_host(facts)}:{facts.witness_port}"),
            "routes": f"[{quote(seed_route)}]",
            # the seed must not tell its clients about the witness: they would connect
            # to it, and through its routes reach the seed's streams before the import
            "no_advertise": "true",
        },
    )
    jetstream = rewrite_block(config.jetstream_body, {"store_dir": quote(store)})
    lines = [
        f"server_name: {quote(_witness_name(facts))}",
        f"listen: {quote(f'{HOST}:-1')}",  # any free port: no client uses the witness
        f'http: "{HOST}:0"',  # no monitoring port (the survivor's is taken)
        *([f"pid_file: {quote(pid_file)}"] if pid_file else []),
        "jetstream {\n" + jetstream + "\n}",
        "cluster {\n" + cluster + "\n}",
        "leafnodes {}",  # the survivor's leaf listener and links are its own
        accounts_with_system_user(config.accounts_body, SYSTEM_USER, facts.system_password),
    ]
    if facts.config_text is not None and find(facts.config_text, "port") is not None:
        lines.append("port: -1")
    if facts.admission is not None:  # no service client, even one that finds its port
        lines.append(facts.admission.strip())
    return lines


def _header(facts: RecoveryFacts, what: str) -> str:
    return (
        f"# ClaudeFS quorum recovery of site {facts.site} ({facts.stamp}): {what}.\n"
        "# Written by `cfs admin raft-force-leader`; entries below override the included\n"
        "# config (nats-server takes the last value of a key). Owner-only: it holds the\n"
        "# recovery's system password.\n"
    )


def _manual_plan(
    facts: RecoveryFacts, config: ServerConfig, store: str, new_cluster: str
) -> RecoveryPlan:
    conf_dir = facts.config_file.parent if facts.config_file else PurePosixPath(".")
    include = f"include {quote(facts.config_file.name if facts.config_file else 'nats.conf')}"
    seed_pid, witness_pid = str(conf_dir / "seed.pid"), str(conf_dir / "witness.pid")
    witness = _witness_name(facts)
    witness_store = str(facts.recovery_dir / "witness-store")
    old_store = f"{store.rstrip('/')}.lost-{facts.stamp}"
    seed_body = [include, f"pid_file: {quote(seed_pid)}"]
    files = {
        "seed.conf": _header(facts, f"{facts.server} as the seed of {new_cluster}, admin only")
        + "\n".join(seed_body + _seed_overrides(facts, config, new_cluster, admission=True))
        + "\n",
        "seed-open.conf": _header(facts, f"{facts.server} in {new_cluster}, open to the site")
        + "\n".join(seed_body + _seed_overrides(facts, config, new_cluster, admission=False))
        + "\n",
        "witness.conf": _header(facts, f"{witness}, a throwaway second meta peer")
        + "\n".join(
            [include, *_witness_overrides(facts, config, new_cluster, witness_store, witness_pid)]
        )
        + "\n",
    }
    copy = (
        f"cp {facts.recovery_dir / 'nats'}/seed.conf {facts.recovery_dir / 'nats'}/seed-open.conf "
        f"{facts.recovery_dir / 'nats'}/witness.conf {conf_dir}/"
    )
    lost = ", ".join(facts.lost_urls) or "none"
    closed = facts.admission is not None
    steps: list[Step] = [
        _export(facts),
        Step(
            StepKind.STOP_SERVER,
            Actor.OPERATOR,
            f"stop NATS server {facts.server} ({facts.url}) the way it runs (systemctl, "
            f"kill PID, ...); keep the lost servers ({lost}) down",
            "its store is replaced next; a lost server that comes back later is refused by "
            "the new cluster's name, never mixed in",
        ),
    ]
    if not closed:
        steps.append(
            Step(
                StepKind.STOP_SERVICES,
                Actor.OPERATOR,
                f"stop every ClaudeFS service on {facts.survivor}",
                "the site has no NATS authorization, so only their absence keeps them from "
                "writing into streams that are not imported yet",
            )
        )
    steps += [
        Step(
            StepKind.MOVE_STORE,
            Actor.OPERATOR,
            f"move {facts.server}'s JetStream store aside (never delete it)",
            "JetStream cannot start a new cluster on the old store's Raft state; kept, it "
            "is the last copy besides the export",
            (f"mv {store} {old_store}",),
        ),
        Step(
            StepKind.START_SEED,
            Actor.OPERATOR,
            f"start {facts.server} on the empty store as the seed of cluster {new_cluster}"
            + (", admitting only the recovery admin" if closed else ""),
            "the same name, ports and TLS (its own config, included); a new cluster name and "
            "routes to the witness only"
            + ("; services stay out until the import is complete" if closed else ""),
            (copy, f"nats-server -c {conf_dir / 'seed.conf'}"),
        ),
        Step(
            StepKind.START_WITNESS,
            Actor.OPERATOR,
            f"start the throwaway witness {witness} on {facts.server}'s host",
            "a fresh JetStream meta group needs two peers to elect a leader; the witness "
            f"(port {facts.witness_port}, store {witness_store}) is removed again in a moment",
            (f"nats-server -c {conf_dir / 'witness.conf'}",),
        ),
        Step(
            StepKind.WAIT_SEED,
            Actor.CFS,
            f"wait until {facts.server} answers at {facts.url} as the seed of {new_cluster}",
            "the operator restarts it",
        ),
        Step(
            StepKind.REMOVE_WITNESS,
            Actor.CFS,
            f"remove {witness} from the meta group of {new_cluster}",
            f"{facts.server} is then the only meta peer and leads a one-server cluster",
        ),
        Step(
            StepKind.STOP_WITNESS,
            Actor.OPERATOR,
            f"stop the witness {witness} and delete its store",
            "it is no longer a peer and holds nothing of the site",
            # kill returns at once; the store is deleted only once the server has exited
            # (a server shutting down still writes it: rm would meet new files)
            (
                f"pid=$(cat {witness_pid}); kill $pid; tail --pid=$pid -f /dev/null",
                f"rm -rf {witness_store}",
            ),
        ),
        Step(
            StepKind.WAIT_ALONE,
            Actor.CFS,
            f"wait until {facts.server} is the only server of {new_cluster}",
            "nothing may be placed on the witness",
        ),
        _import(facts),
    ]
    if closed:
        steps.append(
            Step(
                StepKind.OPEN,
                Actor.OPERATOR,
                f"admit the site's services on {facts.server} again: reload (do not restart) "
                "it with seed-open.conf",
                "the streams are complete; a restarted lone seed would wait for a route to the "
                "gone witness, a reload does not",
                (
                    f"cp {conf_dir / 'seed-open.conf'} {conf_dir / 'seed.conf'}",
                    f"kill -HUP $(cat {seed_pid})",
                ),
            )
        )
    else:
        steps.append(
            Step(
                StepKind.START_SERVICES,
                Actor.OPERATOR,
                f"start the ClaudeFS services on {facts.survivor} again",
                "the streams are complete",
            )
        )
    steps += [
        Step(
            StepKind.WAIT_OPEN,
            Actor.CFS,
            f"wait until {facts.server} admits the site's services",
            "the lease hand-over needs the survivor's metadata-raft connected",
        ),
        _hand_leases(facts),
        Step(
            StepKind.KEEP_CONFIG,
            Actor.OPERATOR,
            f"from now on run {facts.server} with {conf_dir / 'seed.conf'} (cluster "
            f"{new_cluster}); then `cfs node add` new nodes, whose servers join {new_cluster}",
            "its own config still names the old cluster, which a restart would rejoin",
        ),
    ]
    return RecoveryPlan(
        Mode.MANUAL,
        facts,
        tuple(steps),
        new_cluster=new_cluster,
        witness=witness,
        old_store=old_store,
        files=files,
    )


def _nomad_plan(
    facts: RecoveryFacts, config: ServerConfig, store: str, new_cluster: str
) -> RecoveryPlan:
    """Under Nomad the survivor's config is the job's template plus the variable item
    `auth_conf` appended at its end; the runner puts the overrides there. The store is
    not moved (no file access through the API): the seed uses a fresh `store_dir` next
    to it and the old one stays where it is, unused."""
    witness = _witness_name(facts)
    new_store = f"{store.rstrip('/')}.reseed-{facts.stamp}"
    jetstream = (
        "jetstream {\n"
        + rewrite_block(config.jetstream_body, {"store_dir": quote(new_store)})
        + "\n}"
    )
    seed = [jetstream, *_seed_overrides(facts, config, new_cluster, admission=True)]
    opened = [jetstream, *_seed_overrides(facts, config, new_cluster, admission=False)]
    files = {
        "seed-overrides.conf": "\n".join(seed) + "\n",
        "open-overrides.conf": "\n".join(opened) + "\n",
        "witness.conf": str(facts.config_text).rstrip()
        + "\n\n"
        + "\n".join(_witness_overrides(facts, config, new_cluster, "/local/witness-store", None))
        + "\n",
    }
    closed = facts.admission is not None
    steps = (
        _export(facts),
        Step(
            StepKind.START_WITNESS,
            Actor.OPERATOR,
            f"Nomad: run the throwaway witness {witness} as a job on {facts.survivor}",
            "a fresh JetStream meta group needs two peers to elect a leader",
        ),
        Step(
            StepKind.START_SEED,
            Actor.OPERATOR,
            f"Nomad: put the seed overrides into the job's variable and restart "
            f"{facts.server}'s task: cluster {new_cluster}, fresh store {new_store}"
            + (", the recovery admin only" if closed else ""),
            f"the old store stays untouched at {store}; services stay out until the import "
            "is complete",
        ),
        Step(
            StepKind.WAIT_SEED,
            Actor.CFS,
            f"wait until {facts.server} answers at {facts.url} as the seed of {new_cluster}",
            "Nomad restarts the task",
        ),
        Step(
            StepKind.REMOVE_WITNESS,
            Actor.CFS,
            f"remove {witness} from the meta group of {new_cluster}",
            f"{facts.server} is then the only meta peer",
        ),
        Step(
            StepKind.STOP_WITNESS,
            Actor.OPERATOR,
            f"Nomad: stop and purge the witness job of {witness}",
            "it is no longer a peer",
        ),
        Step(
            StepKind.WAIT_ALONE,
            Actor.CFS,
            f"wait until {facts.server} is the only server of {new_cluster}",
            "nothing may be placed on the witness",
        ),
        _import(facts),
        Step(
            StepKind.OPEN,
            Actor.OPERATOR,
            f"Nomad: put the site's authorization back into the variable and signal "
            f"{facts.server}'s task to reload (SIGHUP)",
            "the streams are complete; a restarted lone seed would wait for a route",
        ),
        Step(
            StepKind.WAIT_OPEN,
            Actor.CFS,
            f"wait until {facts.server} admits the site's services",
            "the lease hand-over needs the survivor's metadata-raft connected",
        ),
        _hand_leases(facts),
        Step(
            StepKind.KEEP_CONFIG,
            Actor.OPERATOR,
            f"the job's variable now keeps {facts.server} in cluster {new_cluster} on "
            f"{new_store}; new nodes join it (`cfs node add`)",
            "the template alone still names the old cluster and store",
        ),
    )
    return RecoveryPlan(
        Mode.NOMAD,
        facts,
        steps,
        new_cluster=new_cluster,
        witness=witness,
        old_store=store,
        new_store=new_store,
        files=files,
    )
