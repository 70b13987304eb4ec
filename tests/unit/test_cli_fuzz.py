"""Bad input to the `cfs` CLI (issue 19, "bad input everywhere").

Hypothesis over the typer command tree (walked, not listed by hand): unknown options,
values of the wrong type, out-of-range numbers, odd unicode, missing files, and bad
topology, rules and settings files. Every failure is exactly one line on stderr and a
non-zero exit, never a traceback. In process with typer's CliRunner (fast), pointed at
a cluster config file that does not exist so that no command reaches any server; a few
cases also run the real `cfs` console script.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner, Result

from cfs.cli.main import app
from cfs.supervisor.errors import SupervisorError
from cfs.supervisor.topology import Topology
from cfs_alerts.rules import RulesError, load_rules

ROOT = Path(__file__).resolve().parents[2]
# Commands that start or attach long-lived processes when their arguments parse: fuzzed
# only with an argument click refuses before the command runs.
STARTS_PROCESSES = {
    ("dev", "up"),
    ("dev", "run"),
    ("dev", "start"),
    ("dev", "start-site"),
    ("mount",),
    ("service", "run"),
}


@dataclass(frozen=True)
class Param:
    name: str
    opts: tuple[str, ...]
    annotation: Any
    is_flag: bool
    required: bool
    is_option: bool


@dataclass(frozen=True)
class Command:
    path: tuple[str, ...]
    params: tuple[Param, ...]


def _walk(cmd: Any, path: tuple[str, ...]) -> Iterator[Command]:
    subs = getattr(cmd, "commands", None)
    if subs:
        for name, sub in sorted(subs.items()):
            yield from _walk(sub, (*path, name))
        return
    params = []
    for p in cmd.params:
        descriptor = getattr(p, "type_descriptor", None)
        params.append(
            Param(
                name=p.name,
                opts=tuple(p.opts),
                annotation=getattr(descriptor, "annotation", str),
                is_flag=bool(getattr(p, "is_flag", False)),
                required=bool(p.required),
                is_option=p.param_type_name == "option",
            )
        )
    yield Command(path, tuple(params))


COMMANDS = list(_walk(typer.main.get_command(app), ()))
SAFE_TO_RUN = [c for c in COMMANDS if c.path not in STARTS_PROCESSES]

odd_text = st.one_of(
    st.text(
        st.characters(codec="utf-8", exclude_characters="\x00"),
        max_size=12,
    ),
    st.sampled_from(
        [
            "",
            " ",
            "-",
            "--",
            "..",
            "/",
            "é",
            "\u202e",
            "😀" * 40,
            "a" * 5000,
            "nats://",
            "s3://",
            "s3://b/../..",
            "\n",
            "-1",
            "1e999",
            "nan",
            "inf",
            "0x10",
            str(2**64),
            str(-(2**63)),
            "/nonexistent/file",
            "/dev/null",
            "/",
        ]
    ),
)


def value_for(param: Param) -> st.SearchStrategy[str]:
    """Values of the option's own kind that are odd (not necessarily wrong)."""
    kind = param.annotation
    if kind in (int, float) or str(kind).startswith(("int", "float")):
        return st.one_of(
            st.integers(-(2**70), 2**70).map(str),
            st.floats(allow_nan=True, allow_infinity=True).map(str),
            odd_text,
        )
    return odd_text


def bad_token(cmd: Command) -> st.SearchStrategy[list[str]]:
    """One argument click must refuse: an unknown option, a typed option with a value of
    another type, an option without its value."""
    choices: list[st.SearchStrategy[list[str]]] = [
        st.from_regex(r"--[a-z][a-z-]{0,12}", fullmatch=True)
        .filter(lambda o: all(o not in p.opts for p in cmd.params))
        .map(lambda o: [o]),
        st.just(["-Z"]),
    ]
    typed = [p for p in cmd.params if p.is_option and p.annotation in (int, float)]
    if typed:
        choices.append(
            st.tuples(
                st.sampled_from(typed), st.sampled_from(["abc", "", "1x", "--", "é", "0x"])
            ).map(lambda pv: [pv[0].opts[0], pv[1]])
        )
    valued = [p for p in cmd.params if p.is_option and not p.is_flag]
    if valued:
        choices.append(st.sampled_from(valued).map(lambda p: [p.opts[0]]))  # value missing
    return st.one_of(choices)


@st.composite
def invocation(draw: st.DrawFn, commands: list[Command], with_bad: bool) -> list[str]:
    cmd = draw(st.sampled_from(commands))
    args = list(cmd.path)
    for param in cmd.params:
        if not (param.required or draw(st.booleans())):
            continue
        if not param.is_option:
            args.append(draw(odd_text.filter(lambda v: not v.startswith("-"))))
        elif param.is_flag:
            args.append(param.opts[0])
        else:
            args += [param.opts[0], draw(value_for(param))]
    if with_bad:
        # last: an option whose value is missing would take the next token as its value
        args += draw(bad_token(cmd))
    return args


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("CFS_") and name != "CFS_STRICT_CONTRACTS":
            monkeypatch.delenv(name)
    # No command reaches a server: every client command fails on this file first.
    monkeypatch.setenv("CFS_CONFIG", str(tmp_path / "no-such-cluster.json"))
    return CliRunner()


@pytest.fixture
def configured(runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A cluster config that parses (so `cfs fs` gets past its group's settings) and
    names a port nothing listens on."""
    config = tmp_path / "cluster.json"
    config.write_text('{"site": "t", "nats_urls": ["nats://127.0.0.1:1"]}')
    monkeypatch.setenv("CFS_CONFIG", str(config))
    return runner


def assert_one_line_error(result: Result, args: list[str], codes: set[int] | None = None) -> None:
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), (
        f"cfs {args!r} raised {type(exc).__name__}: {exc}"
    )
    assert "Traceback" not in result.output + result.stderr, (args, result.stderr)
    assert result.exit_code != 0, (args, result.output)
    if codes is not None:
        assert result.exit_code in codes, (args, result.exit_code, result.stderr)
    lines = result.stderr.strip("\n").splitlines()
    assert len(lines) == 1, f"cfs {args!r}: {len(lines)} stderr lines:\n{result.stderr}"
    assert lines[0].strip(), (args, result.stderr)


FUZZ = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@FUZZ
@given(data=st.data())
def test_usage_errors_are_one_line_and_exit_2(configured: CliRunner, data: st.DataObject) -> None:
    args = data.draw(invocation(COMMANDS, with_bad=True), label="args")
    result = configured.invoke(app, args)
    assert_one_line_error(result, args, {2})
    assert result.stderr.startswith("error: "), result.stderr


@FUZZ
@given(data=st.data())
def test_odd_values_fail_in_one_line_or_succeed(runner: CliRunner, data: st.DataObject) -> None:
    """Arguments that parse but make no sense (odd names, numbers out of range, missing
    files, no cluster): a one-line error, or success (`cfs version é` is no error)."""
    args = data.draw(invocation(SAFE_TO_RUN, with_bad=False), label="args")
    result = runner.invoke(app, args)
    if result.exit_code == 0 and result.exception is None:
        return
    assert_one_line_error(result, args)


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["admin", "no-such-verb"],
        ["fs", "ls", "--bogus"],
        ["admin", "tier-config", "--flash-bytes", "-5"],
        ["admin", "tier-config", "--high", "1e999"],
        ["cluster", "init", "--bootstrap-node", "n1", "--cluster-name", "c", "--shards", "0"],
        ["cluster", "init", "--bootstrap-node", "n1", "--cluster-name", "c", "--shards", "1000"],
        ["admin", "node-drain"],
        ["fs", "put", "/nonexistent/source", "/x"],
        ["dev", "up", "--topology", "/nonexistent/topology.yaml"],
        ["service", "run", "no-such-service", "--node", "n1"],
        ["admin", "raft-debug", "--shard", "x"],
        ["umount", "\x85"],  # a line break to str.splitlines(), in the path it names
        ["fs", "put", "/nonexistent/a\u2028b", "/x"],
    ],
    ids=lambda a: " ".join(a)[:40],
)
def test_known_bad_invocations(runner: CliRunner, args: list[str]) -> None:
    assert_one_line_error(runner.invoke(app, args), args)


def test_dev_down_purges_only_a_dev_sites_directory(runner: CliRunner, tmp_path: Path) -> None:
    """Found by the fuzz test: `dev down --purge --state-dir .` deleted the working
    directory (and would have deleted any directory named, a home directory too)."""
    (tmp_path / "precious").write_text("keep me")
    args = ["dev", "down", "--purge", "--state-dir", "."]
    result = runner.invoke(app, args)
    assert_one_line_error(result, args, {2})
    assert "holds no dev site" in result.stderr
    assert (tmp_path / "precious").read_text() == "keep me"
    (tmp_path / "precious").unlink()  # empty, as the fuzz test's working directory was
    result = runner.invoke(app, args)
    assert_one_line_error(result, args, {2})
    assert tmp_path.is_dir(), "an empty directory that is no dev site's is kept too"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CFS_NATS_URLS", "[not json"),
        ("CFS_SHARDS", "abc"),
        ("CFS_SHARDS", "100000"),
        ("CFS_OP_TIMEOUT_S", "-1"),
        ("CFS_PEER", "{}"),
        ("CFS_METRICS_PORT", "99999999999999999999"),
    ],
)
def test_bad_client_variables(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.delenv("CFS_CONFIG")
    monkeypatch.setenv(name, value)
    for args in (["fs", "ls", "/"], ["admin", "status"]):
        result = runner.invoke(app, args)
        assert_one_line_error(result, args, {1})
        assert name.removeprefix("CFS_").lower() in result.stderr, result.stderr


def test_a_plain_url_in_cfs_nats_urls_is_a_list_of_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The variable takes what `--cluster` takes (comma-separated), or a JSON list; a
    plain URL used to fail with pydantic-settings' traceback."""
    from cfs.fuse.config import client_settings

    monkeypatch.delenv("CFS_CONFIG", raising=False)
    monkeypatch.setenv("CFS_NATS_URLS", "nats://a:4222, nats://b:4222")
    assert client_settings().nats_urls == ["nats://a:4222", "nats://b:4222"]
    monkeypatch.setenv("CFS_NATS_URLS", '["nats://c:4222"]')
    assert client_settings().nats_urls == ["nats://c:4222"]


# -- files ------------------------------------------------------------------------------

yaml_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False),
    st.text(max_size=20),
)
yaml_trees = st.recursive(
    yaml_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=15,
)
TOPOLOGY_KEYS = [
    "site",
    "peer_site",
    "shards",
    "nats_servers",
    "ec",
    "s3",
    "s3_port",
    "nodes",
    "env",
    "bogus",
]


@st.composite
def topology_text(draw: st.DrawFn) -> bytes:
    """Near-valid topologies with one part wrong, plain garbage, and YAML that is not."""
    kind = draw(st.sampled_from(["near", "tree", "bytes", "broken"]))
    if kind == "near":
        tree: dict[str, Any] = {"site": "local", "nodes": [{"name": "storage-1"}]}
        tree[draw(st.sampled_from(TOPOLOGY_KEYS))] = draw(yaml_trees)
        return yaml.safe_dump(tree, allow_unicode=True).encode()
    if kind == "tree":
        return yaml.safe_dump(draw(yaml_trees), allow_unicode=True).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    return draw(st.sampled_from(BROKEN_YAML))


BROKEN_YAML = [
    b"nodes: [",
    b"nodes:\n  - name: a\n name: b",
    b"\t- tab",
    b"site: local\nsite: other\nnodes: [{name: a}]",
    b"nodes: &a [*a]",
    b"a: &a [" + b",".join([b"*a"] * 9) + b"]\nb: &b [" + b",".join([b"*a"] * 9) + b"]",
    b"\xff\xfe\xfa",
    b"site: local\nnodes:\n  - name: " + b"x" * 100_000,
    b"shards: " + b"9" * 5000 + b"\nnodes: [{name: a}]",
    b"[" * 5000 + b"]" * 5000,
    b"!!python/object/apply:os.system ['true']",
    b"--- a\n--- b",
]


@settings(FUZZ, max_examples=40)
@given(text=topology_text())
def test_topology_file(runner: CliRunner, tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "topology.yaml"
    path.write_bytes(text)
    try:
        Topology.load(path)
    except SupervisorError as exc:
        assert len(str(exc).splitlines()) == 1 and str(path) in str(exc)
    else:
        return  # a valid topology: `cfs dev up` would start it
    args = ["dev", "up", "--topology", str(path)]
    assert_one_line_error(runner.invoke(app, args), args, {1})


@FUZZ
@given(text=topology_text())
def test_rules_file(tmp_path: Path, text: bytes) -> None:
    path = tmp_path / "rules.yaml"
    path.write_bytes(text)
    try:
        load_rules(path)
    except RulesError as exc:
        assert len(str(exc).splitlines()) == 1 and str(path) in str(exc)


@pytest.mark.parametrize(
    "content",
    [
        b"{",
        b"[]",
        b"\xff",
        b'{"shards": "x"}',
        b'{"nats_urls": 5}',
        b'{"peer": {"site": "a b"}}',
        b"null",
        b"",
    ],
)
def test_cluster_config_file(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "cluster.json"
    path.write_bytes(content)
    monkeypatch.setenv("CFS_CONFIG", str(path))
    args = ["admin", "status"]
    result = runner.invoke(app, args)
    assert_one_line_error(result, args, {1})
    assert str(path) in result.stderr, result.stderr


# -- the console script -----------------------------------------------------------------


def _cfs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CFS_")}
    base["CFS_CONFIG"] = "/nonexistent/cluster.json"
    return subprocess.run(
        [sys.executable, "-m", "cfs.cli", *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=60,
        cwd="/tmp",
    )


CONSOLE_SCRIPT = {
    "usage": (["version", "--bogus"], {}, 2),
    "env": (["admin", "status"], {"CFS_CONFIG": "", "CFS_NATS_URLS": "[x"}, 1),
    "topology": (["dev", "up", "--topology", str(ROOT / "pyproject.toml")], {}, 1),
    "service-config": (
        ["service", "run", "chunk-store", "--node", "n1", "--config", "/nonexistent"],
        {},
        1,
    ),
    "service-env": (["service", "run", "chunk-store", "--node", "n1"], {"CFS_NATS_URLS": "[x"}, 1),
}


@pytest.fixture(scope="module")
def console_script_runs() -> dict[str, subprocess.CompletedProcess[str]]:
    """Each case of CONSOLE_SCRIPT run once, side by side (each costs an interpreter's
    start and changes nothing); each test below checks one."""
    with ThreadPoolExecutor(max_workers=4) as pool:
        done = pool.map(lambda case: _cfs(*case[0], env=case[1]), CONSOLE_SCRIPT.values())
        return dict(zip(CONSOLE_SCRIPT, done, strict=True))


@pytest.mark.parametrize("case", list(CONSOLE_SCRIPT))
def test_console_script(
    console_script_runs: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    _, _, code = CONSOLE_SCRIPT[case]
    done = console_script_runs[case]
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == code, (done.returncode, done.stderr)
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
