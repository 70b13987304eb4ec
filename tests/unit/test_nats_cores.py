"""nats-servers sharing one machine share its cores (GOMAXPROCS)."""

from __future__ import annotations

import pytest

from cfs.supervisor.nats import cores_per_server, go_procs_env


@pytest.mark.parametrize(
    ("servers", "cores", "share"),
    [(1, 2, 2), (3, 2, 1), (3, 8, 2), (6, 2, 1), (2, 16, 8), (0, 4, 4)],
)
def test_each_server_gets_its_share_and_at_least_one_core(
    servers: int, cores: int, share: int
) -> None:
    assert cores_per_server(servers, cores) == share


def test_the_operators_gomaxprocs_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOMAXPROCS", raising=False)
    assert go_procs_env(1) == {"GOMAXPROCS": "1"}
    assert go_procs_env(None) == {}
    monkeypatch.setenv("GOMAXPROCS", "4")
    assert go_procs_env(1) == {}  # the inherited 4 stays
