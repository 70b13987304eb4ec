"""Topology files: the shipped ones parse, the default file is the built-in default."""

from __future__ import annotations

from pathlib import Path

import pytest

from cfs.supervisor import SupervisorError
from cfs.supervisor.topology import Topology

TOPOLOGIES = Path(__file__).resolve().parents[2] / "deploy" / "topologies"


def test_default_file_is_the_builtin_default() -> None:
    assert Topology.load(TOPOLOGIES / "default.yaml") == Topology.default()


def test_six_nodes_spread_over_three_racks() -> None:
    six = Topology.load(TOPOLOGIES / "six-nodes.yaml")
    assert len(six.nodes) == 6
    assert {node.labels["rack"] for node in six.nodes} == {"r1", "r2", "r3"}


def test_two_sites_share_nodes_and_settings() -> None:
    two = Topology.load(TOPOLOGIES / "two-sites.yaml")
    assert two.sites == ["site-a", "site-b"] and len(two.nodes) == 3
    assert two.summary == "sites site-a and site-b (3 nodes each)"
    assert Topology.default().sites == ["local"]
    assert Topology.default(1).summary == "site local (1 node)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodes: []", "nodes: List should have at least 1 item"),
        ("nodes: [{name: a}]\nshards: 0", "shards: Input should be greater than or equal to 1"),
        ("nodes: [{name: a}]\nextra: 1", "extra: Extra inputs are not permitted"),
        ("nodes: [{name: a, labels: {rack: 1}}]", "nodes.0.labels.rack"),
        ("nodes: [{name: a}]\nsite: x\npeer_site: x", "peer_site must name another site"),
        ("nodes: [{name: a}]\npeer_site: 'b c'", "peer_site: String should match pattern"),
    ],
)
def test_bad_topologies_are_one_message(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(SupervisorError, match=r"topology .*t\.yaml") as caught:
        Topology.load(path)
    assert message in str(caught.value)
