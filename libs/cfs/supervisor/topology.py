"""What `cfs dev up --topology FILE` runs: one site (or two linked ones), its nodes,
labels and tuning.

A topology file is YAML (see `deploy/topologies/`):

    site: local
    shards: 1
    nodes:
      - name: storage-1
        labels: {rack: r1}
      - name: storage-2
    env:                      # extra CFS_* settings for every service process
      CFS_REPAIR_GRACE_S: "120"
    peer_site: remote         # optional: a second site with the same nodes and
                              # settings, linked to the first (DESIGN.md §8)
"""

from __future__ import annotations

from pathlib import Path

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from cfs.supervisor.errors import SupervisorError
from cfs.yamlfile import load_yaml_model


class NodeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    labels: dict[str, str] = Field(default_factory=dict, description="failure domains")


class Topology(BaseModel):
    model_config = ConfigDict(extra="forbid")

    site: str = Field(default="local", pattern=r"^[A-Za-z0-9_-]+$")
    peer_site: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="a second site, linked to the first: same nodes, shards, env and ec, "
        "its own processes (None: one site)",
    )
    shards: int = Field(default=1, ge=1, le=999, description="fixed at cluster init")
    nats_servers: int | None = Field(
        default=None, ge=1, description="default: 3 beside the first 3 nodes, 1 below 3 nodes"
    )
    ec: str = Field(default="auto", description="erasure code for new chunks (cluster init)")
    s3: bool = Field(default=True, description="run an S3 server (moto) for tiering/backups")
    s3_port: int | None = Field(
        default=None, ge=1, le=65535, description="the S3 server's port (default: a free one)"
    )
    nodes: list[NodeSpec] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)

    @field_validator("nodes")
    @classmethod
    def _unique(cls, nodes: list[NodeSpec]) -> list[NodeSpec]:
        names = [node.name for node in nodes]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate node names: {', '.join(duplicates)}")
        return nodes

    @model_validator(mode="after")
    def _two_names(self) -> Topology:
        if self.peer_site == self.site:
            raise ValueError(f"peer_site must name another site than {self.site!r}")
        return self

    @classmethod
    def default(cls, nodes: int = 3) -> Topology:
        """One site, `nodes` nodes storage-1..N, one shard: `deploy/topologies/default.yaml`."""
        return cls(nodes=[NodeSpec(name=f"storage-{i}") for i in range(1, nodes + 1)])

    @classmethod
    def load(cls, path: Path) -> Topology:
        """Parse a topology file; any problem is one SupervisorError naming the file."""
        return load_yaml_model(path, cls, "topology", SupervisorError)

    @property
    def node_names(self) -> list[str]:
        return [node.name for node in self.nodes]

    @property
    def sites(self) -> list[str]:
        """The site names, the first (the one `cluster.json` names) first."""
        return [self.site] if self.peer_site is None else [self.site, self.peer_site]

    @property
    def summary(self) -> str:
        """What starts, in a few words: `site local (3 nodes)`."""
        nodes = f"{len(self.nodes)} node{'s' if len(self.nodes) != 1 else ''}"
        if self.peer_site is None:
            return f"site {self.site} ({nodes})"
        return f"sites {self.site} and {self.peer_site} ({nodes} each)"
