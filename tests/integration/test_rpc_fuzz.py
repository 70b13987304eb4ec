"""Bad input to every service's request subjects (issue 19, "bad input everywhere").

One single-node site runs every service that serves requests (metadata-raft,
chunk-store, membership, s3-tierer, backup). The subjects under test are not a hand
table: they are the subscriptions the NATS server reports (`/subsz`) that match a
subject some service spec declares it serves (`Grants.serve`), so a new responder is
fuzzed as soon as it is declared. Each gets malformed, empty, truncated, oversized
(just under the server's max_payload; one byte over is refused by the client before it
leaves) and wrong-version payloads: the answer is a clear error (an `errno` with a
message, or a `Cfs-Error` header) or a read-only answer, never silence; afterwards
every process is alive and answers a good request, the journals and the chunk-store
hold what they held before, and nothing was logged at WARNING or above.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import nats.errors
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfs.bus import Bus, PayloadTooLarge, RequestTimeout
from cfs.kernel.registry import specs
from cfs.supervisor import LocalSite
from cfs.supervisor._http import http_get
from cfs_contracts.data import (
    HEADER_CRC,
    HEADER_ERRNO,
    HEADER_ERROR,
    HEADER_KEY,
    HEADER_STORED_MS,
    chunk_rpc_subject,
)
from cfs_contracts.fs.records import ROOT_INO
from cfs_contracts.fs.rpc import GetAttr, Request
from cfs_contracts.streams import meta_rpc_subject, shard_name
from cfs_metadata.journal import Journal

SITE = "fz"
NODE = "n1"
SHARDS = 2
SERVICES = ("metadata-raft", "chunk-store", "membership", "s3-tierer", "backup")
REPLY_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Served:
    service: str
    subject: str  # concrete: a wildcard subscription's tokens filled in


def _tokens_match(pattern: str, subject: str) -> bool:
    """NATS matching of `subject` (itself possibly a wildcard subscription) by `pattern`."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def served_subjects(site: LocalSite) -> list[Served]:
    """What the running services answer, per their specs: each subscription on the
    server matching a declared `serve` subject of a service under test."""
    server = site.nats_servers[0]
    status, body = http_get(f"{server.monitor_url}/subsz?subs=1&limit=100000", timeout=5.0)
    assert status == 200, status
    subscribed = {sub["subject"] for sub in json.loads(body).get("subscriptions_list", [])}
    found: set[Served] = set()
    for spec in specs():
        if spec.name not in SERVICES:
            continue
        for declared in spec.grants.serve:
            pattern = declared.format(s=f"cfs.{SITE}", n=NODE)
            for subject in subscribed:
                if _tokens_match(pattern, subject):
                    concrete = subject.replace(">", "fuzz").replace("*", "fuzz")
                    found.add(Served(spec.name, concrete))
    return sorted(found, key=lambda s: s.subject)


@pytest.fixture(scope="module")
def site(s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    running = LocalSite(
        tmp_path_factory.mktemp("rpcfuzz") / "site",
        (NODE,),
        servers=1,
        shards=SHARDS,
        site=SITE,
        secure=False,
        services=SERVICES,
        env={**s3_env, "CFS_GC_INTERVAL_S": "0", "CFS_COMPACT_S": "3600"},
    )
    try:
        asyncio.run(running.start())
        asyncio.run(running.wait_ready())
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def subjects(site: LocalSite) -> list[Served]:
    found = served_subjects(site)
    served = {s.service for s in found}
    # every service under test declares and serves at least one subject
    assert served == set(SERVICES), (served, [s.subject for s in found])
    print(f"\nrequest subjects under test: {[s.subject for s in found]}")
    return found


@dataclass(frozen=True)
class Snapshot:
    journal: tuple[int, ...]
    fragments: int


async def state(bus: Bus) -> Snapshot:
    """What a bad request must not change: each shard's journal, this node's fragments."""
    seqs = []
    for shard in range(1, SHARDS + 1):
        seqs.append(await Journal(bus, shard).last_seq())
    reply = await bus.request(chunk_rpc_subject(SITE, NODE, "stat"), b"", timeout=10)
    return Snapshot(tuple(seqs), int(json.loads(reply.data)["status"]["fragments"]))


def clear_answer(subject: str, data: bytes, headers: dict[str, str] | None) -> str:
    """'error' or 'ok'; fails on an error that does not say what is wrong."""
    if headers and ("Cfs-Error" in headers or HEADER_ERRNO in headers):
        assert headers.get(HEADER_ERROR, "").strip(), (subject, headers)
        return "error"
    try:
        answer = json.loads(data) if data else None
    except ValueError:
        return "ok"  # a fragment's bytes (`get`)
    if isinstance(answer, dict) and answer.get("errno"):
        assert str(answer.get("message", "")).strip(), (subject, answer)
        return "error"
    return "ok"


async def ask(bus: Bus, subject: str, payload: bytes, headers: dict[str, str] | None) -> str:
    try:
        reply = await bus.request(subject, payload, timeout=REPLY_TIMEOUT_S, headers=headers)
    except RequestTimeout:
        pytest.fail(f"no answer from {subject} to {payload[:80]!r} (headers {headers})")
    return clear_answer(subject, reply.data, reply.headers)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=16),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
GOOD_META = Request(body=GetAttr(ino=ROOT_INO)).model_dump_json().encode()


def wrong_version(body: dict[str, Any]) -> bytes:
    """A well-formed request of a schema this release does not have."""
    return json.dumps({**body, "v": 99, "version": 2}).encode()


payloads = st.one_of(
    st.just(b""),
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.integers(1, len(GOOD_META) - 1).map(lambda n: GOOD_META[:n]),  # truncated
    st.just(wrong_version({"body": {"op": "getattr", "ino": ROOT_INO}})),
    st.just(json.dumps({"body": {"op": "mkdir", "v": 2, "parent": 1, "name": "x"}}).encode()),
    st.just(json.dumps({"body": {"op": "getattr.v9", "ino": 1}}).encode()),
    st.just(b"[" * 20_000 + b"]" * 20_000),
    st.just(b'{"after": "' + b"9" * 5000 + b'"}'),
)
header_sets = st.none() | st.dictionaries(
    st.sampled_from([HEADER_KEY, HEADER_CRC, HEADER_STORED_MS, "traceparent", "X-Fuzz"]),
    st.text(st.characters(codec="ascii", exclude_characters="\r\n:\x00"), max_size=40),
    max_size=3,
)


class Fuzzer:
    """One bus for every example (hypothesis runs the examples in a sync test)."""

    def __init__(self, site: LocalSite) -> None:
        self.loop = asyncio.new_event_loop()
        self.bus: Bus = self.loop.run_until_complete(site.client("fuzzer"))
        self.answers: dict[tuple[str, str], int] = {}

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.run(self.bus.close())
        self.loop.close()


@pytest.fixture(scope="module")
def fuzzer(site: LocalSite) -> Iterator[Fuzzer]:
    running = Fuzzer(site)
    try:
        yield running
    finally:
        running.close()


def check_unharmed(site: LocalSite, fuzzer: Fuzzer, before: Snapshot, served: list[Served]) -> None:
    for proc in site.processes():
        assert proc.running, f"{proc!r} exited after bad input"
    assert fuzzer.run(state(fuzzer.bus)) == before, "a bad request changed the site"
    good = fuzzer.run(fuzzer.bus.request(meta_rpc_subject(SITE, shard_name(1)), GOOD_META))
    assert json.loads(good.data)["errno"] == 0
    for item in served:  # every responder still answers (garbage: nothing to run)
        fuzzer.run(ask(fuzzer.bus, item.subject, b"\xff", None))


FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def fuzz_requests(site: LocalSite, subjects: list[Served], fuzzer: Fuzzer, examples: int) -> None:
    before = fuzzer.run(state(fuzzer.bus))

    @settings(FUZZ, max_examples=examples)
    @given(
        served=st.sampled_from(subjects),
        payload=payloads,
        headers=header_sets,
    )
    def probe(served: Served, payload: bytes, headers: dict[str, str] | None) -> None:
        outcome = fuzzer.run(ask(fuzzer.bus, served.subject, payload, headers))
        key = (served.subject, outcome)
        fuzzer.answers[key] = fuzzer.answers.get(key, 0) + 1

    probe()
    check_unharmed(site, fuzzer, before, subjects)


def test_bad_requests_get_a_clear_answer_and_change_nothing(
    site: LocalSite, subjects: list[Served], fuzzer: Fuzzer
) -> None:
    fuzz_requests(site, subjects, fuzzer, examples=300)


@pytest.mark.slow
def test_many_bad_requests(site: LocalSite, subjects: list[Served], fuzzer: Fuzzer) -> None:
    fuzz_requests(site, subjects, fuzzer, examples=5000)


def test_every_subject_refuses_garbage(
    site: LocalSite, subjects: list[Served], fuzzer: Fuzzer
) -> None:
    """Each subject (not only those hypothesis happened to draw) with the same fixed
    set: empty, not JSON, truncated, wrong version, nested too deeply."""
    before = fuzzer.run(state(fuzzer.bus))
    fixed = [
        b"",
        b"\xff\xfe garbage",
        GOOD_META[: len(GOOD_META) // 2],
        wrong_version({"body": {"op": "getattr", "ino": ROOT_INO}}),
        b"[" * 20_000 + b"]" * 20_000,
    ]
    for served in subjects:
        for payload in fixed:
            fuzzer.run(ask(fuzzer.bus, served.subject, payload, None))
    check_unharmed(site, fuzzer, before, subjects)


def test_oversized_requests(site: LocalSite, subjects: list[Served], fuzzer: Fuzzer) -> None:
    """Just under the server's max_payload: answered like any bad request. Over it: the
    client refuses to send (nats-py checks the server's limit), a typed error."""
    before = fuzzer.run(state(fuzzer.bus))
    limit = fuzzer.bus.nc.max_payload
    for served in subjects:
        under = b"\xfe" * (limit - 4096)  # room for the subject and headers
        fuzzer.run(ask(fuzzer.bus, served.subject, under, None))
        with pytest.raises((PayloadTooLarge, nats.errors.MaxPayloadError)):
            fuzzer.run(fuzzer.bus.request(served.subject, b"x" * (limit + 1), timeout=2))
    check_unharmed(site, fuzzer, before, subjects)
