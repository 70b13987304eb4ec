"""The permission table and credentials files of `cfs.security` (pure; no server)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.security import (
    AUTH_CONF,
    CredentialsError,
    Identity,
    Role,
    connect_options,
    credentials_for,
    credentials_path,
    ensure_credentials,
    ensure_keys,
    identities,
    inbox_prefix,
    load_credentials,
    per_node_roles,
    permissions,
    public_key,
    roles,
    subject_matches,
    write_auth_conf,
)

SITE = "prod"
SERVICES = ["metadata", "chunkstore", "membership", "repair"]


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.*.c", "a.x.c", True),
        ("a.b", "a.c", False),
        ("a.*", "a.>", False),
        ("a.>", "a.*", True),
        (">", "anything.at.all", True),
    ],
)
def test_subject_matches(pattern: str, subject: str, expected: bool) -> None:
    assert subject_matches(pattern, subject) is expected


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5))
def test_a_literal_subject_matches_itself_and_full_wildcard(tokens: list[str]) -> None:
    subject = ".".join(tokens)
    assert subject_matches(subject, subject)
    assert subject_matches(">", subject)
    assert subject_matches(".".join(["*"] * len(tokens)), subject)


def test_admin_may_do_everything_and_only_admin_issues_commands() -> None:
    admin = permissions(Role.ADMIN, SITE, 2)
    assert admin.may_publish("$JS.API.STREAM.DELETE.META_001")
    for role in [Role.CLIENT, *SERVICES]:
        perms = permissions(role, SITE, 2)
        assert not perms.may_publish(f"cfs.{SITE}.cmd.metadata.raft-force-leader"), role
        assert not perms.may_publish(f"cfs.{SITE}.cmd.membership.node-remove"), role
        for verb in ("CREATE", "UPDATE", "DELETE", "PURGE"):
            assert not perms.may_publish(f"$JS.API.STREAM.{verb}.META_001"), (role, verb)
        assert not perms.may_publish("$JS.API.SERVER.REMOVE"), role


def test_only_metadata_appends_to_the_journals_and_takes_shard_leases() -> None:
    journal = f"cfs.{SITE}.meta.001.op"
    lease = "$KV.leases.meta.001"
    for role in [Role.CLIENT, "chunkstore", "membership", "repair"]:
        perms = permissions(role, SITE, 2)
        assert not perms.may_publish(journal), role
        assert not perms.may_publish(lease), role
    metadata = permissions("metadata", SITE, 2)
    assert metadata.may_publish(journal) and metadata.may_publish(lease)
    assert metadata.may_publish("$JS.API.STREAM.LEADER.STEPDOWN.META_002")
    assert not metadata.may_publish("$JS.API.STREAM.LEADER.STEPDOWN.META_003")  # no shard 3


def test_node_records_are_written_by_their_owners_only() -> None:
    keys = {"member.n", "store.n", "admin.n", "repair.n", "cluster.config"}
    allowed = {
        role: {k for k in keys if permissions(role, SITE, 1).may_publish(f"$KV.nodes.{k}")}
        for role in roles()
    }
    assert allowed["chunkstore"] == {"store.n"}
    assert allowed["membership"] == {"member.n", "admin.n"}
    assert allowed["repair"] == {"repair.n", "admin.n"}
    assert allowed["metadata"] == set()
    assert allowed[Role.CLIENT] == set()
    assert allowed[Role.ADMIN] == keys
    health = {
        role: permissions(role, SITE, 1, "n").may_publish("$KV.health.n.metadata-raft")
        for role in roles()
    }
    assert {role for role, may in health.items() if may} == {"metadata", Role.ADMIN}


def test_each_role_reads_only_its_own_inbox_and_serves_only_its_subjects() -> None:
    for role in [Role.CLIENT, *SERVICES]:
        perms = permissions(role, SITE, 1)
        assert perms.may_subscribe(f"{inbox_prefix(role)}.abc")
        for other in [Role.CLIENT, *SERVICES]:
            if other is not role:
                assert not perms.may_subscribe(f"{inbox_prefix(other)}.abc"), (role, other)
        assert not perms.may_subscribe(f"cfs.{SITE}.meta.001.op"), role  # no journal snooping
    assert permissions("chunkstore", SITE, 1).may_subscribe(f"cfs.{SITE}.rpc.chunk.n1.get")
    assert not permissions(Role.CLIENT, SITE, 1).may_subscribe(f"cfs.{SITE}.rpc.chunk.n1.get")
    assert not permissions("chunkstore", SITE, 1).may_subscribe(f"cfs.{SITE}.rpc.meta.001")


def test_only_repair_asks_for_rebuilds_and_a_store_only_reads_its_peers() -> None:
    rebuild, get, put = (f"cfs.{SITE}.rpc.chunk.n1.{verb}" for verb in ("rebuild", "get", "put"))
    assert permissions("repair", SITE, 1).may_publish(rebuild)
    client = permissions(Role.CLIENT, SITE, 1)
    assert not client.may_publish(rebuild)
    assert client.may_publish(get) and client.may_publish(put)
    store = permissions("chunkstore", SITE, 1)
    assert store.may_publish(get)  # a rebuild reads the survivors itself
    assert not store.may_publish(put) and not store.may_publish(rebuild)


def test_permissions_are_per_site() -> None:
    assert not permissions(Role.CLIENT, SITE, 1).may_publish("cfs.other.rpc.meta.001")
    assert permissions(Role.CLIENT, SITE, 1).may_publish(f"cfs.{SITE}.rpc.meta.001")


def test_credentials_files_are_secret_kept_and_loadable(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    conf = ensure_credentials(directory, SITE, 2)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    seeds = {}
    for role in roles():
        path = credentials_path(directory, role)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        loaded = load_credentials(path)
        assert (loaded.role, loaded.site, loaded.inbox_prefix) == (
            role,
            SITE,
            inbox_prefix(role),
        )
        seeds[role] = loaded.seed
        assert connect_options(path) == {
            "nkeys_seed_str": loaded.seed,
            "inbox_prefix": inbox_prefix(role),
        }
    text = conf.read_text()
    assert conf.name == AUTH_CONF
    for seed in seeds.values():
        assert seed not in text  # the server side holds public keys only
        assert public_key(seed) in text
    ensure_keys(directory, SITE)  # again: the same keys, services keep working
    assert {role: load_credentials(credentials_path(directory, role)).seed for role in roles()} == (
        seeds
    )


def test_unusable_credentials_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialsError, match="cannot read NATS credentials"):
        connect_options(tmp_path / "missing.nk")
    bad = tmp_path / "bad.nk"
    bad.write_text("# role=client\nnot-a-seed\n")
    with pytest.raises(CredentialsError, match="no valid NATS NKey seed"):
        load_credentials(bad)
    jwt = tmp_path / "user.creds"
    jwt.write_text("-----BEGIN NATS USER JWT-----\nabc\n------END NATS USER JWT------\n")
    assert connect_options(jwt) == {"user_credentials": str(jwt)}


def test_a_service_reads_only_its_own_admin_commands() -> None:
    metadata = permissions("metadata", SITE, 1)
    assert metadata.may_publish("$JS.API.CONSUMER.MSG.NEXT.CMD.cmd-metadata-raft")
    assert not metadata.may_publish("$JS.API.CONSUMER.MSG.NEXT.CMD.cmd-membership")
    assert not metadata.may_publish("$JS.API.CONSUMER.CREATE.CMD.spy")
    assert permissions("membership", SITE, 1).may_publish("$JS.ACK.CMD.cmd-membership.1.2.3")


def test_a_per_node_key_writes_only_its_own_nodes_records_and_subjects() -> None:
    store = permissions("chunkstore", SITE, 1, "n1")
    assert store.may_publish("$KV.nodes.store.n1")
    assert not store.may_publish("$KV.nodes.store.n2")
    assert store.may_publish("$KV.health.n1.chunk-store")
    assert not store.may_publish("$KV.health.n2.chunk-store")
    assert store.may_subscribe(f"cfs.{SITE}.rpc.chunk.n1.get")
    assert not store.may_subscribe(f"cfs.{SITE}.rpc.chunk.n2.get")
    assert not store.may_subscribe(f"cfs.{SITE}.rpc.chunk.*.get")
    assert store.may_publish(f"cfs.{SITE}.rpc.chunk.n2.get")  # rebuilds read the survivors
    assert store.may_subscribe(f"{inbox_prefix('chunkstore', 'n1')}.x")
    assert not store.may_subscribe(f"{inbox_prefix('chunkstore', 'n2')}.x")
    member = permissions("membership", SITE, 1, "n1")
    assert member.may_subscribe(f"cfs.{SITE}.rpc.membership.n1.view")
    assert not member.may_subscribe(f"cfs.{SITE}.rpc.membership.n2.view")
    assert member.may_publish("$KV.nodes.member.n2")  # SWIM's verdicts cover every node
    for role in ("metadata", "repair"):
        mine = permissions(role, SITE, 1, "n1")
        spec_name = {"metadata": "metadata-raft", "repair": "repair"}[role]
        assert mine.may_publish(f"$KV.health.n1.{spec_name}")
        assert not mine.may_publish(f"$KV.health.n2.{spec_name}")
    # a site-wide role ignores the node: its key is shared
    assert permissions("tierer", SITE, 1, "n1") == permissions("tierer", SITE, 1)


def test_identities_are_per_node_for_per_node_roles_only() -> None:
    assert set(per_node_roles()) == {"chunkstore", "membership", "metadata", "repair"}
    found = identities(["n1", "n2"])
    assert Identity("chunkstore", "n1") in found and Identity("chunkstore", "n2") in found
    assert Identity("chunkstore") not in found
    assert Identity(Role.CLIENT) in found and Identity(Role.ADMIN) in found
    assert Identity(Role.CLIENT, "n1") not in found
    assert Identity("chunkstore") in identities()  # no nodes known: one shared key
    assert Identity.parse(Identity("chunkstore", "n-1").name) == Identity("chunkstore", "n-1")


def test_per_node_keys_are_files_of_their_own_and_in_the_auth_conf(tmp_path: Path) -> None:
    directory = tmp_path / "creds"
    conf = ensure_credentials(directory, SITE, 1, nodes=["n1", "n2"])
    assert not credentials_path(directory, "chunkstore").exists()
    one = credentials_path(directory, "chunkstore", "n1")
    assert one.name == "chunkstore@n1.nk" and stat.S_IMODE(one.stat().st_mode) == 0o600
    loaded = load_credentials(one)
    assert (loaded.role, loaded.node, loaded.inbox_prefix) == (
        "chunkstore",
        "n1",
        "_INBOX.chunkstore.n1",
    )
    assert credentials_for(directory, "chunkstore", "n1") == one
    assert credentials_for(directory, Role.CLIENT, "n1") == credentials_path(directory, "client")
    text = conf.read_text()
    assert "# chunkstore@n1" in text and "# chunkstore@n2" in text
    assert '"$KV.nodes.store.n1"' in text and '"$KV.nodes.store.n2"' in text
    assert public_key(loaded.seed) in text
    ensure_keys(directory, SITE, nodes=["n3"])  # a node added later
    write_auth_conf(directory, SITE, 1)
    assert "# chunkstore@n3" in conf.read_text()
    assert load_credentials(one).seed == loaded.seed  # the others' keys are kept


def test_the_admin_key_is_scoped_to_what_admin_commands_need() -> None:
    admin = permissions(Role.ADMIN, SITE, 2)
    for subject in (
        f"cfs.{SITE}.cmd.membership.node-drain",  # admin commands
        f"cfs.{SITE}.rpc.meta.001",  # metadata checks, snapshots
        "$JS.API.STREAM.CREATE.META_001",  # provisioning, recovery
        "$JS.site-b.API.STREAM.INFO.KV_nodes",  # the peer site over the link
        "$KV.nodes.cluster.config",
        "$JS.ACK.CMD.x.1.1.1.1.1",
    ):
        assert admin.may_publish(subject), subject
    assert admin.may_subscribe(f"{inbox_prefix(Role.ADMIN)}.x")
    assert admin.may_subscribe(f"cfs.{SITE}.cluster.node.n1.down")  # watching events
    for role in [Role.CLIENT, *SERVICES]:  # another role's replies: not read, not forged
        assert not admin.may_subscribe(f"{inbox_prefix(role)}.x"), role
        assert not admin.may_publish(f"{inbox_prefix(role)}.x"), role
    assert not admin.may_subscribe(">") and not admin.may_publish(">")
    assert not admin.may_publish("$SYS.REQ.SERVER.PING")
    assert not admin.may_subscribe("$JS.EVENT.ADVISORY.>")
    assert not admin.may_publish("other.app.subject")


def test_a_chunk_store_announces_only_its_own_fragments() -> None:
    store = permissions("chunkstore", SITE, 1, "n1")
    assert store.may_publish(f"cfs.{SITE}.data.n1.stored")
    assert not store.may_publish(f"cfs.{SITE}.data.n2.stored")
    assert not store.may_publish(f"cfs.{SITE}.data.n2.deleted")
