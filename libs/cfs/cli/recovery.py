"""The options of `cfs admin raft-force-leader` for a recovery without quorum
(`cfs.recovery.drive`): where its files go, how long it waits, who restarts the server."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

RecoveryDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--recovery-dir",
        help="without quorum: where the export and the server configs go "
        "(default: recovery/<UTC stamp> beside the cluster config)",
    ),
]
RecoveryWaitOpt = Annotated[
    float,
    typer.Option("--wait", min=1.0, help="without quorum: seconds to wait for each server step"),
]
NomadOpt = Annotated[
    str | None,
    typer.Option("--nomad", help="Nomad HTTP API address: restart the NATS task through it"),
]
NomadJobOpt = Annotated[str, typer.Option("--nomad-job", help="the site's NATS job in Nomad")]
NatsConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--nats-config",
        help="without a dev supervisor or Nomad: the surviving nats-server's config file",
    ),
]
NatsStoreOpt = Annotated[
    str | None,
    typer.Option("--nats-store", help="its JetStream store dir, if its config does not say"),
]
WitnessPortOpt = Annotated[
    int,
    typer.Option("--witness-port", min=1, max=65535, help="route port of the throwaway witness"),
]
