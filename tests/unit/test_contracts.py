"""Contracts: golden samples of every schema version decode forever."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cfs_contracts
from cfs_contracts import REGISTRY, Envelope, SchemaVersionError, UnknownEventType
from cfs_contracts.asyncapi import build
from cfs_contracts.envelope import HLC
from cfs_contracts.events.cluster import NodeJoined, NodeJoinedV1, node_joined_v1_to_v2
from cfs_contracts.registry import ContractError, MalformedEvent, decode_envelope, encode_envelope
from cfs_contracts.streams import site_streams

GOLDEN = Path(cfs_contracts.__file__).parent / "golden"
ULID = "01JDV3Q8Z4F6M0000000000000"


def golden_files() -> list[Path]:
    return sorted(GOLDEN.glob("*.json"))


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_golden_sample_decodes_strictly(path: Path) -> None:
    event = REGISTRY.decode(path.read_bytes(), strict=True)
    kind, version = path.stem.rsplit(".v", 1)
    assert event.envelope.type == kind
    assert event.stored_version == int(version)
    assert REGISTRY.current_version(kind) == type(event.payload).VERSION


def test_every_schema_version_has_a_golden_sample() -> None:
    have = {p.stem for p in golden_files()}
    want = {f"{s.type}.v{s.version}" for s in REGISTRY.specs()}
    assert want == have


def test_registry_has_an_upcaster_for_every_old_version() -> None:
    REGISTRY.check_complete()


def test_node_joined_v1_upcasts_to_v2() -> None:
    event = REGISTRY.decode((GOLDEN / "NodeJoined.v1.json").read_bytes())
    assert event.payload == NodeJoined(
        node_id="storage-1", host="10.0.0.11", port=7946, labels={}, capacity_bytes=0
    )


@given(
    host=st.from_regex(r"[a-z0-9.\-]{1,30}", fullmatch=True),
    port=st.integers(1, 65535),
)
def test_upcast_keeps_host_and_port(host: str, port: int) -> None:
    out = node_joined_v1_to_v2({"node_id": "n", "address": f"{host}:{port}"})
    assert (out["host"], out["port"]) == (host, port)
    v1 = NodeJoinedV1(node_id="n", address=f"[::1]:{port}")
    assert node_joined_v1_to_v2(v1.model_dump())["host"] == "::1"


def _envelope(**overrides: object) -> bytes:
    data: dict[str, object] = json.loads((GOLDEN / "NodeDown.v1.json").read_text())
    data.update(overrides)
    return json.dumps(data).encode()


def test_unknown_type_is_a_typed_error() -> None:
    with pytest.raises(UnknownEventType, match="unknown event type 'NoSuchThing'"):
        REGISTRY.decode(_envelope(type="NoSuchThing"))


def test_too_new_version_is_refused_with_a_clear_message() -> None:
    with pytest.raises(SchemaVersionError, match="NodeDown v9 is newer than this release"):
        REGISTRY.decode(_envelope(v=9))


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (_envelope(id="not-a-ulid"), "id: Value error, not a ULID"),
        (_envelope(payload={"node_id": "x"}), "NodeDown v1: incarnation"),
    ],
)
def test_malformed_input_gets_one_line_reason(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedEvent) as info:
        REGISTRY.decode(raw, strict=True)
    assert message.split(": Field")[0].split(": Value")[0] in str(info.value)
    assert "\n" not in str(info.value)


def test_strict_mode_rejects_unknown_payload_fields_lenient_ignores_them() -> None:
    raw = _envelope(payload={"node_id": "a", "incarnation": 1, "detected_by": "b", "new": 1})
    with pytest.raises(MalformedEvent, match="unexpected fields"):
        REGISTRY.decode(raw, strict=True)
    assert REGISTRY.decode(raw, strict=False).payload.model_dump()["node_id"] == "a"


def test_writers_may_only_emit_the_current_version() -> None:
    with pytest.raises(SchemaVersionError, match="writers emit v2"):
        REGISTRY.envelope(
            NodeJoinedV1(node_id="n", address="h:1"),
            event_id=ULID,
            site="s",
            node="n",
            hlc=HLC(wall_ms=1, counter=0, node="n"),
        )


def test_envelope_round_trip() -> None:
    env = REGISTRY.envelope(
        NodeJoined(node_id="n1", host="h", port=1),
        event_id=ULID,
        site="s",
        node="n1",
        hlc=HLC(wall_ms=5, counter=2, node="n1"),
    )
    raw = encode_envelope(env)
    assert REGISTRY.decode(raw).envelope == env
    generic = Envelope.model_validate_json(raw)
    assert generic.payload == env.payload_dict()
    assert encode_envelope(generic) == raw


@pytest.mark.parametrize("path", golden_files(), ids=lambda p: p.stem)
def test_one_pass_decode_agrees_with_the_generic_path(path: Path) -> None:
    """Current versions parse straight into their models; the result must not differ."""
    raw = path.read_bytes()
    fast = REGISTRY.decode(raw, strict=True)
    generic = REGISTRY.parse(decode_envelope(raw), strict=True)
    assert fast.payload == generic.payload
    assert fast.stored_version == generic.stored_version
    assert type(fast.envelope) is Envelope
    assert fast.envelope.model_dump(exclude={"payload"}) == generic.envelope.model_dump(
        exclude={"payload"}
    )


def test_subject_templates_fill_and_validate() -> None:
    spec = REGISTRY.spec("NodeDown")
    assert spec.subject("site-a", node_id="storage-1") == "cfs.site-a.cluster.node.storage-1.down"
    with pytest.raises(ContractError, match="needs node_id"):
        spec.subject("site-a")
    with pytest.raises(ContractError, match="invalid subject token"):
        spec.subject("site-a", node_id="a.b")


def test_stream_subjects_do_not_overlap_and_rpc_is_not_captured() -> None:
    subjects = [s for spec in site_streams(3) for s in spec.subjects_for("x")]
    assert len(subjects) == len(set(subjects))
    assert not any(s.startswith("cfs.x.rpc") for s in subjects)
    every_event_subject_is_captured = all(
        any(
            spec.subject_template.replace("{site}", "x").startswith(s.rstrip(">"))
            or (spec.stream == "META" and s.startswith("cfs.x.meta."))
            for s in subjects
        )
        for spec in REGISTRY.specs()
    )
    assert every_event_subject_is_captured


def test_committed_asyncapi_document_is_up_to_date() -> None:
    committed = json.loads((Path(cfs_contracts.__file__).parent / "asyncapi.json").read_text())
    assert committed == build(), "contracts changed: run `make asyncapi` and commit the result"


def test_site_ranges_of_inode_numbers_are_disjoint_and_recoverable() -> None:
    from cfs_contracts.fs.records import (
        MAX_SITE_INDEX,
        SITE_LOCAL_SHIFT,
        make_ino,
        shard_of,
        site_floor,
        site_of,
    )

    assert site_floor(0) == 1  # a single site numbers as it always did
    for index in (0, 1, MAX_SITE_INDEX):
        first = make_ino(999, site_floor(index))
        last = make_ino(999, (index + 1 << SITE_LOCAL_SHIFT) - 1)
        for ino in (first, last):
            assert (site_of(ino), shard_of(ino)) == (index, 999)
    assert make_ino(999, (MAX_SITE_INDEX + 1 << SITE_LOCAL_SHIFT) - 1) < 2**63  # an ino_t
    with pytest.raises(ValueError, match="site index"):
        site_floor(MAX_SITE_INDEX + 1)
