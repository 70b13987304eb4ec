"""deploy/: the image, the compose files and the Nomad jobs run every service the specs
declare (DESIGN.md §2: derived from the specs, never kept by hand), as `cfs service run
NAME --node ID`, with a health check on its `/metrics`, a restart policy and its own
credentials mounted read-only; and the tools that run them take them.

No container runtime works on these machines, so the files are validated, never run:
`docker-compose config` (Debian's docker-compose, installed by `make setup`) parses and
validates each compose file, python-hcl2 parses the Nomad jobs and `nats-server -t`
takes the NATS configs the compose files mount.

The checks (`compose_problems`, `nomad_problems`) compare the files with a list of
specs; the last tests give them a list with a service added or one taken away, so a spec
missing from the files, or a file running a service no spec declares, is reported.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml

from cfs.kernel import registry
from cfs.kernel.spec import ServiceSpec
from cfs.security import credentials_for, ensure_credentials
from cfs.supervisor.nats import nats_server_binary
from cfs.tls import ca_path, ensure_server_cert

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose"
NOMAD = ROOT / "deploy" / "nomad"
NODES = ("storage-1", "storage-2", "storage-3")
CONFIG_DIR = "/srv/cfs-config"  # a dummy: `config` only interpolates it
# What the operator exports before `docker-compose up` (dummy values: nothing is run).
COMPOSE_ENV = {
    "site.yaml": {
        "CFS_CONFIG_DIR": CONFIG_DIR,
        "CFS_CLUSTER_TOKEN": "dummy-token",
        "CFS_S3_ACCESS_KEY": "dummy-access",
        "CFS_S3_SECRET_KEY": "dummy-secret",
    },
    "two-sites.yaml": {
        "CFS_CONFIG_DIR_A": f"{CONFIG_DIR}/site-a",
        "CFS_CONFIG_DIR_B": f"{CONFIG_DIR}/site-b",
        "CFS_CLUSTER_TOKEN_A": "dummy-token-a",
        "CFS_CLUSTER_TOKEN_B": "dummy-token-b",
        "CFS_LEAF_PASSWORD": "dummy-link-password",
        "CFS_S3_ACCESS_KEY": "dummy-access",
        "CFS_S3_SECRET_KEY": "dummy-secret",
    },
}
CFS_COMMAND = ["cfs", "service", "run"]
# Files from the config dir: keys, certificates, the S3 keys, the NATS authorization.
SECRET_FILE = re.compile(r"(\.nk|\.pem|\.key|s3\.ini|auth\.conf)$")
# What `cfs dev` gives every service process whatever its settings (LocalSite._build_node).
COMMON_ENV = {"CFS_DATA_DIR", "CFS_SHARDS", "CFS_LABELS", "CFS_NODE"}
# python-hcl2 gives a heredoc with its markers: <<EOT\n...\nEOT
HEREDOC = re.compile(r"<<-?(\w+)\n(.*\n)\1", re.S)


# -- running the tools ------------------------------------------------------------------------
def docker_compose(name: str, env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("docker-compose")
    if tool is None:
        pytest.fail(
            "docker-compose is not installed: `make setup` installs Debian's docker-compose "
            "(apt-get install --no-install-recommends docker-compose); the compose files "
            "cannot be validated without it"
        )
    return subprocess.run(
        [tool, "--project-directory", str(COMPOSE), "-f", str(COMPOSE / name), "config"],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@functools.cache
def compose_config(name: str) -> dict[str, Any]:
    """The file as `docker-compose config` resolves it (anchors merged, variables set)."""
    done = docker_compose(name, COMPOSE_ENV[name])
    assert done.returncode == 0, f"docker-compose config {name}:\n{done.stderr}"
    config = yaml.safe_load(done.stdout)
    assert isinstance(config, dict)
    return config


def _unquote(value: Any) -> Any:
    """python-hcl2 keeps the quotes of strings and block labels, and marks blocks."""
    if isinstance(value, dict):
        return {
            _unquote(k): _unquote(v)
            for k, v in value.items()
            if k not in ("__is_block__", "__comments__", "__inline_comments__")
        }
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    if isinstance(value, str) and (heredoc := HEREDOC.fullmatch(value)):
        return heredoc.group(2)
    return value


@functools.cache
def nomad_jobs() -> dict[str, dict[str, Any]]:
    """job name -> job body, from every `*.nomad.hcl`."""
    jobs: dict[str, dict[str, Any]] = {}
    for path in sorted(NOMAD.glob("*.nomad.hcl")):
        with path.open() as fh:
            parsed = _unquote(hcl2.load(fh))
        for block in parsed.get("job", []):
            for name, body in block.items():
                assert name not in jobs, f"job {name} is defined twice"
                jobs[name] = {**body, "_file": path.name}
    assert jobs, f"no Nomad job under {NOMAD}"
    return jobs


def _blocks(body: Mapping[str, Any], kind: str) -> list[dict[str, Any]]:
    """The `kind` blocks of an HCL body (hcl2 gives a list of one-key dicts or bodies)."""
    found = body.get(kind, [])
    return found if isinstance(found, list) else [found]


def _labelled(body: Mapping[str, Any], kind: str) -> dict[str, dict[str, Any]]:
    """label -> body of the labelled `kind` blocks (group "x" { ... })."""
    return {label: inner for block in _blocks(body, kind) for label, inner in block.items()}


# -- the checks ----------------------------------------------------------------------------------
def _service_and_node(argv: Sequence[str]) -> tuple[str, str | None] | None:
    """`cfs service run NAME [--node ID]` -> (NAME, ID); None for any other command."""
    if list(argv[:3]) != CFS_COMMAND or len(argv) < 4:
        return None
    rest = list(argv[4:])
    node = rest[rest.index("--node") + 1] if "--node" in rest[:-1] else None
    return argv[3], node


def _volume(entry: str | Mapping[str, Any]) -> tuple[str, str, bool]:
    """(source, target, read_only) of a compose volume, short or long syntax."""
    if isinstance(entry, str):
        parts = entry.split(":")
        return parts[0], parts[1], "ro" in parts[2:]
    return str(entry.get("source")), str(entry["target"]), bool(entry.get("read_only"))


def compose_problems(
    config: Mapping[str, Any],
    specs: Sequence[ServiceSpec],
    nodes: Sequence[str] = NODES,
    *,
    linked: bool,
) -> list[str]:
    """What a resolved compose file gets wrong against `specs`, site by site: every
    per-node service once per node, every site service once (those that need a peer
    only on linked sites), nothing else; each container with its metrics health check,
    restart policy, and its own key and the site CA mounted read-only."""
    by_name = {spec.name: spec for spec in specs}
    problems: list[str] = []
    placed: dict[str, dict[str, list[str | None]]] = {}  # site -> service -> nodes
    for where, service in config["services"].items():
        argv = [*service.get("entrypoint", []), *service.get("command", [])]
        volumes = [_volume(v) for v in service.get("volumes", [])]
        problems += [
            f"{where}: {source} is mounted writable"
            for source, _, read_only in volumes
            if SECRET_FILE.search(source) and not read_only
        ]
        if str(service.get("image", "")).startswith("nats:"):
            problems += _compose_nats_problems(where, service, volumes)
            continue
        if "claudefs" not in str(service.get("image", "")) and argv[:1] != ["cfs"]:
            continue  # MinIO
        run = _service_and_node(argv)
        if run is None:
            problems.append(f"{where}: runs {argv}, not `cfs service run NAME --node ID`")
            continue
        name, node = run
        env = service.get("environment", {})
        site = env.get("CFS_SITE", "?")
        placed.setdefault(site, {}).setdefault(name, []).append(node)
        spec = by_name.get(name)
        if spec is None:
            problems.append(f"{where}: runs {name!r}, which no service spec declares")
            continue
        if node is None:
            problems.append(f"{where}: {name} has no --node")
        check = service.get("healthcheck", {}).get("test", [])
        if "/metrics" not in " ".join(check) or not env.get("CFS_METRICS_PORT"):
            problems.append(f"{where}: no health check on /metrics at CFS_METRICS_PORT")
        if service.get("restart") not in ("always", "unless-stopped", "on-failure"):
            problems.append(f"{where}: no restart policy")
        key = env.get("CFS_NATS_CREDENTIALS")
        wanted = credentials_for(Path("/"), spec.role, node).name
        mounted = {target: ro for _, target, ro in volumes}
        if key is None or Path(key).name != wanted:
            problems.append(f"{where}: connects with {key}, not its own key {wanted}")
        elif mounted.get(key) is not True:
            problems.append(f"{where}: its key {key} is not mounted read-only")
        if mounted.get(env.get("CFS_NATS_CA", "")) is not True:
            problems.append(f"{where}: the site CA (CFS_NATS_CA) is not mounted read-only")
    for site, services in sorted(placed.items()):
        problems += _placement_problems(f"site {site}", services, specs, nodes, linked=linked)
    if not placed:
        problems.append("no ClaudeFS service at all")
    return problems


def _compose_nats_problems(
    where: str, service: Mapping[str, Any], volumes: Sequence[tuple[str, str, bool]]
) -> list[str]:
    targets = {target for _, target, _ in volumes}
    wanted = {"/etc/nats/auth.conf", "/etc/nats/tls/ca.pem", "/etc/nats/tls/server.pem"}
    problems = [f"{where}: {t} is not mounted" for t in sorted(wanted - targets)]
    if "healthcheck" not in service or service.get("restart") is None:
        problems.append(f"{where}: no health check or restart policy")
    return problems


def _placement_problems(
    scope: str,
    placed: Mapping[str, Sequence[str | None]],
    specs: Sequence[ServiceSpec],
    nodes: Sequence[str],
    *,
    linked: bool,
) -> list[str]:
    problems = []
    for spec in specs:
        got = sorted(str(node) for node in placed.get(spec.name, []))
        if spec.needs_peer and not linked:
            if got:
                problems.append(f"{scope}: {spec.name} needs a peer site but runs here")
            continue
        if spec.per_node and got != sorted(nodes):
            problems.append(f"{scope}: per-node {spec.name} runs on {got}, not on {list(nodes)}")
        if not spec.per_node and len(got) != 1:
            problems.append(f"{scope}: site service {spec.name} runs {len(got)} times, not once")
    return problems


def nomad_problems(
    jobs: Mapping[str, Mapping[str, Any]], specs: Sequence[ServiceSpec]
) -> list[str]:
    """What the Nomad jobs get wrong against `specs`: each service in exactly one group,
    per-node ones in system jobs, site ones in service jobs spread over racks with a
    reschedule policy; each task `cfs service run NAME --node ${node.unique.name}`, an
    HTTP check on /metrics, a restart policy, and its key from a Nomad variable."""
    by_name = {spec.name: spec for spec in specs}
    problems: list[str] = []
    placed: dict[str, list[str]] = {}
    for job_name, job in jobs.items():
        job_type = job.get("type", "service")
        for group_name, group in _labelled(job, "group").items():
            where = f"{job['_file']}: job {job_name} group {group_name}"
            if not _blocks(group, "restart"):
                problems.append(f"{where}: no restart policy")
            for task_name, task in _labelled(group, "task").items():
                config = _blocks(task, "config")[0]
                argv = [*config.get("entrypoint", []), *config.get("args", [])]
                run = _service_and_node(argv)
                if run is None:
                    if job_name != "cfs-nats":
                        problems.append(f"{where}: task {task_name} runs {argv}")
                    continue
                name, node = run
                placed.setdefault(name, []).append(where)
                spec = by_name.get(name)
                if spec is None:
                    problems.append(f"{where}: runs {name!r}, which no service spec declares")
                    continue
                problems += _nomad_task_problems(where, job_type, group, task, spec, node)
    for spec in specs:
        count = len(placed.get(spec.name, []))
        if count != 1:
            problems.append(f"{spec.name} is in {count} Nomad groups, not one")
    return problems


def _nomad_task_problems(
    where: str,
    job_type: str,
    group: Mapping[str, Any],
    task: Mapping[str, Any],
    spec: ServiceSpec,
    node: str | None,
) -> list[str]:
    problems = []
    wanted_type = "system" if spec.per_node else "service"
    if job_type != wanted_type:
        problems.append(f"{where}: {spec.name} is in a {job_type} job, not a {wanted_type} job")
    if node != "${node.unique.name}":
        problems.append(f"{where}: --node {node}, not the Nomad node's name")
    if job_type == "service":
        spreads = [s.get("attribute") for s in _blocks(group, "spread")]
        if "${meta.rack}" not in spreads:
            problems.append(f"{where}: not spread over racks")
        if not _blocks(group, "reschedule"):
            problems.append(f"{where}: no reschedule policy")
    checks = [
        check
        for service in _blocks(task, "service") + _blocks(group, "service")
        for check in _blocks(service, "check")
    ]
    if not any(c.get("type") == "http" and c.get("path") == "/metrics" for c in checks):
        problems.append(f"{where}: no HTTP check on /metrics")
    env = _blocks(task, "env")[0] if _blocks(task, "env") else {}
    if env.get("CFS_METRICS_PORT") != "${NOMAD_PORT_metrics}":
        problems.append(f"{where}: CFS_METRICS_PORT is not the metrics port")
    templates = {t.get("destination"): t for t in _blocks(task, "template")}
    key = str(env.get("CFS_NATS_CREDENTIALS", ""))
    role_file = credentials_for(Path("/"), spec.role, None).name
    source = templates.get(key.lstrip("/"))
    if Path(key).name != role_file or not key.startswith("/secrets/") or source is None:
        problems.append(f"{where}: CFS_NATS_CREDENTIALS {key!r} is not its key in secrets/")
    else:
        data = str(source.get("data", ""))
        if "nomadVar" not in data:
            problems.append(f"{where}: its key does not come from a Nomad variable")
        if spec.per_node and "node.unique.name" not in data:
            problems.append(f"{where}: a per-node service's key is not its node's")
        if str(source.get("perms", "")) not in ("0400", "0440", "0600"):
            problems.append(f"{where}: its key is readable by others ({source.get('perms')})")
    return problems


# -- the files as they are ------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(COMPOSE_ENV))
def test_docker_compose_validates_the_file(name: str) -> None:
    config = compose_config(name)
    assert config["services"], name


@pytest.mark.parametrize("name", sorted(COMPOSE_ENV))
def test_a_compose_file_refuses_to_start_without_its_secrets(name: str) -> None:
    """Nothing secret has a default: each required variable missing is an error."""
    for missing in COMPOSE_ENV[name]:
        env = {k: v for k, v in COMPOSE_ENV[name].items() if k != missing}
        done = docker_compose(name, env)
        assert done.returncode != 0 and missing in done.stderr, (missing, done.stderr)


def test_the_site_runs_every_service_of_the_specs() -> None:
    assert compose_problems(compose_config("site.yaml"), registry.specs(), linked=False) == []


def test_two_sites_run_every_service_on_each_site_linked_by_leaf_nodes() -> None:
    config = compose_config("two-sites.yaml")
    assert compose_problems(config, registry.specs(), linked=True) == []
    sites = {s["environment"].get("CFS_SITE") for s in config["services"].values()}
    assert {"site-a", "site-b"} <= sites
    services = config["services"]
    for i in (1, 2, 3):  # every leaf server dials every hub server, over TLS
        hub, leaf = services[f"site-a-nats-{i}"], services[f"site-b-nats-{i}"]
        assert hub["command"][-1].endswith("hub.conf") and leaf["command"][-1].endswith("leaf.conf")
        urls = [leaf["environment"][f"LEAF_URL_{j}"] for j in (1, 2, 3)]
        assert [url.rsplit("@", 1)[1] for url in urls] == [
            f"site-a-nats-{j}:7422" for j in (1, 2, 3)
        ]
        assert any(v.endswith("/etc/nats/tls/peer-ca.pem:ro") for v in leaf["volumes"])
        assert "link" in hub["networks"] and "link" in leaf["networks"]
    # the sites' services reach each other only through NATS
    for where, service in services.items():
        if not where.split("-", 2)[-1].startswith("nats"):
            assert "link" not in service.get("networks", {}), where


def test_the_nomad_jobs_run_every_service_of_the_specs() -> None:
    assert nomad_problems(nomad_jobs(), registry.specs()) == []


def test_the_nomad_nats_job_spreads_three_tls_servers_over_racks() -> None:
    job = nomad_jobs()["cfs-nats"]
    group = _labelled(job, "group")["nats"]
    assert group["count"] == 3
    assert [s["attribute"] for s in _blocks(group, "spread")] == ["${meta.rack}"]
    assert any(c.get("operator") == "distinct_hosts" for c in _blocks(group, "constraint"))
    assert _blocks(group, "restart") and _blocks(group, "reschedule")
    task = _labelled(group, "task")["nats-server"]
    config = next(t for t in _blocks(task, "template") if t["destination"] == "local/nats.conf")
    text = str(config["data"])
    assert text.count("cert_file:") == 2 and "verify: true" in text.split("cluster {")[1]
    assert "sync_interval: always" in text
    secrets = [t for t in _blocks(task, "template") if t["destination"].startswith("secrets/")]
    assert secrets and all("nomadVar" in str(t["data"]) for t in secrets)


def test_each_service_takes_the_environment_the_files_give_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every `CFS_*` variable names a setting of that service (or its S3 settings), and
    the compose values parse: a misspelt variable would be ignored silently."""
    from cfs.objstore.settings import ServiceS3Settings

    s3_fields = {f"CFS_S3_{name.upper()}" for name in ServiceS3Settings.model_fields}
    given: list[tuple[str, ServiceSpec, str, Mapping[str, str]]] = []
    for name in COMPOSE_ENV:
        for where, service in compose_config(name)["services"].items():
            run = _service_and_node([*service.get("entrypoint", []), *service.get("command", [])])
            if run is not None:
                spec, node = registry.by_name(run[0]), str(run[1])
                given.append((f"{name}: {where}", spec, node, service["environment"]))
    for job in nomad_jobs().values():
        for group in _labelled(job, "group").values():
            for task_name, task in _labelled(group, "task").items():
                if task_name == "nats-server":
                    continue
                env = dict(_blocks(task, "env")[0])
                for template in _blocks(task, "template"):
                    if template.get("env"):  # variables rendered from Nomad's catalogue
                        named = re.findall(r"^(CFS_\w+)=", template["data"], re.M)
                        env.update(dict.fromkeys(named, ""))
                given.append((f"nomad: {task_name}", registry.by_name(task_name), "", env))
    unknown = []
    for where, spec, node, env in given:
        settings = spec.settings()
        fields = {f"CFS_{name.upper()}" for name in settings.model_fields}
        unknown += [
            f"{where}: {var}"
            for var in env
            if var.startswith("CFS_") and var not in fields | s3_fields | COMMON_ENV
        ]
        if where.startswith("nomad"):
            continue  # its values are Nomad's to interpolate
        for var in [v for v in os.environ if v.startswith("CFS_")]:
            monkeypatch.delenv(var)
        for var, value in env.items():
            monkeypatch.setenv(var, str(value))
        settings(node=node)
        if any(var.startswith("CFS_S3_") for var in env):
            ServiceS3Settings()
    assert unknown == []


def test_every_nats_config_of_the_compose_files_is_taken_by_nats_server(tmp_path: Path) -> None:
    """nats.conf, hub.conf and leaf.conf with the environment compose gives the servers
    and the files `cfs cluster credentials` writes, checked by `nats-server -t`."""
    credentials = tmp_path / "credentials"
    auth = ensure_credentials(credentials, "site-a", 1, nodes=NODES)
    tls = ensure_server_cert(credentials, "site-a", "nats-1", ["nats-1", "localhost"])
    etc = tmp_path / "etc"
    (etc / "tls").mkdir(parents=True)
    for conf in (COMPOSE / "nats").glob("*.conf"):
        text = conf.read_text().replace("/etc/nats/", f"{etc}/")
        (etc / conf.name).write_text(text.replace("/data/jetstream", str(tmp_path / "js")))
    shutil.copy(auth, etc / "auth.conf")
    shutil.copy(tls.cert, etc / "tls" / "server.pem")
    shutil.copy(tls.key, etc / "tls" / "server.key")
    shutil.copy(ca_path(credentials), etc / "tls" / "ca.pem")
    shutil.copy(ca_path(credentials), etc / "tls" / "peer-ca.pem")
    servers = [
        ("site.yaml", "nats-1"),
        ("two-sites.yaml", "site-a-nats-1"),
        ("two-sites.yaml", "site-b-nats-1"),
    ]
    for name, server in servers:
        service = compose_config(name)["services"][server]
        conf = etc / Path(service["command"][-1]).name
        check = subprocess.run(
            [nats_server_binary(), "-c", str(conf), "-t"],
            env={"PATH": os.environ.get("PATH", ""), **service["environment"]},
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        assert check.returncode == 0, f"{name} {server}: {check.stderr}"
        assert "include ./auth.conf" in (etc / "nats.conf").read_text()


def test_the_image_runs_cfs_as_a_user_and_the_mount_target_has_fuse3() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = set(re.findall(r"^FROM \S+ AS (\S+)$", dockerfile, re.M))
    assert {"build", "service", "mount"} <= stages
    service = dockerfile.split(" AS service")[1].split(" AS mount")[0]
    assert re.search(r"^USER (?!root|0\b)\S+", service, re.M), "the services run as root"
    assert 'ENTRYPOINT ["cfs"]' in service and "/metrics" in service
    mount = dockerfile.split(" AS mount")[1]
    assert "fuse3" in mount and re.search(r"^USER (?!root|0\b)\S+\s*$", mount, re.M)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "*" in ignored and {"**/*.nk", "**/*.key", "**/credentials"} <= set(ignored)


# -- the checks can fail -------------------------------------------------------------------
def _with_extra_spec(per_node: bool) -> list[ServiceSpec]:
    base = registry.by_name("alerts")
    extra = dataclasses.replace(base, name="dedup", role="dedup", per_node=per_node)
    return [*registry.specs(), extra]


@pytest.mark.parametrize("per_node", [True, False], ids=["per-node", "site"])
def test_a_spec_missing_from_the_files_is_reported(per_node: bool) -> None:
    specs = _with_extra_spec(per_node)
    for name in COMPOSE_ENV:
        problems = compose_problems(compose_config(name), specs, linked=name != "site.yaml")
        assert any("dedup" in p for p in problems), (name, problems)
    problems = nomad_problems(nomad_jobs(), specs)
    assert problems == ["dedup is in 0 Nomad groups, not one"]


def test_a_service_no_spec_declares_is_reported() -> None:
    specs = [spec for spec in registry.specs() if spec.name != "chunk-store"]
    problems = compose_problems(compose_config("site.yaml"), specs, linked=False)
    assert len([p for p in problems if "'chunk-store', which no service spec" in p]) == 3
    problems = nomad_problems(nomad_jobs(), specs)
    assert any("'chunk-store', which no service spec declares" in p for p in problems)


def test_a_writable_key_a_shared_key_or_a_missing_health_check_is_reported() -> None:
    config = json.loads(json.dumps(compose_config("site.yaml")))
    store = config["services"]["storage-2-chunk-store"]
    store["volumes"] = [v.removesuffix(":ro") if ".nk" in v else v for v in store["volumes"]]
    membership = config["services"]["storage-1-membership"]
    membership["environment"]["CFS_NATS_CREDENTIALS"] = "/etc/claudefs/credentials/membership.nk"
    del config["services"]["backup"]["healthcheck"]
    problems = compose_problems(config, registry.specs(), linked=False)
    assert any(p.startswith("storage-2-chunk-store:") and "writable" in p for p in problems)
    assert any(p.startswith("storage-1-membership:") and "own key" in p for p in problems)
    assert any(p.startswith("backup:") and "/metrics" in p for p in problems)

    jobs = json.loads(json.dumps(nomad_jobs()))
    node_job = jobs["cfs-node"]
    repair = _labelled(node_job, "group")["repair"]
    repair.pop("restart")
    site_job = jobs["cfs-site"]
    _labelled(site_job, "group")["alerts"].pop("spread")
    problems = nomad_problems(jobs, registry.specs())
    assert any("group repair: no restart policy" in p for p in problems), problems
    assert any("group alerts: not spread over racks" in p for p in problems), problems


def _render_nomad_template(data: str, items: Mapping[str, str], server: str) -> str:
    """The few consul-template constructs the NATS job uses, rendered as Nomad would for
    `server` with the variables' `items` (every `nomadVar` answers from them)."""
    text = data.replace("${var.site}", "site-a")
    text = text.replace('{{ env "node.unique.name" }}', server)
    text = re.sub(
        r'\{\{ range nomadService "cfs-nats-cluster" \}\}(.*?)\{\{ end \}\}',
        lambda m: m.group(1).replace("{{ .Address }}", "10.0.0.1").replace("{{ .Port }}", "6222"),
        text,
    )
    if not items.get("linked"):  # no `cfs/<site>/link` variable: the block is left out
        text = re.sub(r"\{\{ if nomadVarExists .*?\{\{ end \}\}\{\{ end \}\}", "", text, flags=re.S)
    text = re.sub(r'\{\{ if nomadVarExists "[^"]+" \}\}', "", text)
    text = re.sub(r"\{\{ with nomadVar [^}]+\}\}", "", text)
    text = re.sub(
        r"\{\{ if \.(\w+) \}\}", lambda m: "" if items.get(m.group(1)) else "{{ skip }}", text
    )
    text = re.sub(r"\{\{ skip \}\}.*?\{\{ end \}\}", "", text, flags=re.S)
    text = re.sub(r"\{\{ \.(\w+) \}\}", lambda m: items[m.group(1)], text)
    text = text.replace("{{ end }}", "")
    assert "{{" not in text, text
    return text


@pytest.mark.parametrize("link", ["none", "hub", "leaf"])
def test_the_nomad_nats_config_is_taken_by_nats_server(tmp_path: Path, link: str) -> None:
    """The job's templates rendered (alone, hub of a site link, leaf of one) with the
    files `cfs cluster credentials` writes, checked by `nats-server -t`."""
    credentials = tmp_path / "credentials"
    auth = ensure_credentials(credentials, "site-a", 1, nodes=NODES)
    tls = ensure_server_cert(credentials, "site-a", "storage-1", ["10.0.0.1"])
    items = {
        "auth_conf": auth.read_text(),
        "cert": tls.cert.read_text(),
        "key": tls.key.read_text(),
        "ca": ca_path(credentials).read_text(),
        "peer_ca": ca_path(credentials).read_text() if link == "leaf" else "",
        "hub_password": "dummy-link-password" if link == "hub" else "",
        "remote_urls": '"nats-leaf://cfs-site-link:pw@10.0.9.1:7422"' if link == "leaf" else "",
        "linked": "yes" if link != "none" else "",
    }
    task = _labelled(_labelled(nomad_jobs()["cfs-nats"], "group")["nats"], "task")["nats-server"]
    root = tmp_path / "alloc"
    for template in _blocks(task, "template"):
        text = _render_nomad_template(str(template["data"]), items, "storage-1")
        text = text.replace('"/secrets/', f'"{root}/secrets/').replace("/data/", f"{tmp_path}/")
        path = root / str(template["destination"])
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    conf = (root / "local" / "nats.conf").read_text()
    assert "leafnodes" not in conf and (
        "leafnodes" in (root / "secrets" / "auth.conf").read_text()
    ) == (link != "none")
    check = subprocess.run(
        [nats_server_binary(), "-c", str(root / "local" / "nats.conf"), "-t"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
