"""Two sites on this machine, linked as DESIGN.md §8 has it (tests, `cfs dev`).

Each site is its own `LocalSite`: its own NATS cluster and JetStream domain (named
after the site), metadata and nodes, so a partition stops neither. The link is what
NATS provides: every server of site `b` is a leaf node of site `a`'s servers, one
leaf connection per `b` server, each through a `LinkProxy` per `a` server; cutting
the proxies is a real partition (`partition`/`heal`). Over the link each site
reaches the other's JetStream as `$JS.<site>.API` (stream sources across domains:
durable and resumable by construction) and the other's services by their subjects.

    pair = SitePair(tmp_path, nodes=3)
    await pair.start()
    pair.partition()     # both sites keep working; nothing crosses
    pair.heal()
    pair.stop()
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from cfs.supervisor.linkproxy import LinkProxy
from cfs.supervisor.nats import LeafRemote
from cfs.supervisor.site import LocalSite
from cfs.tls import ca_path

LEAF_USER = "cfs-site-link"  # the leaf connection's user on the hub site's servers


class SitePair:
    def __init__(
        self,
        base_dir: Path,
        a: str = "site-a",
        b: str = "site-b",
        *,
        site_env: Mapping[str, Mapping[str, str]] | None = None,
        **site: Any,
    ) -> None:
        """`site`: LocalSite arguments for both sites (nodes, shards, services, env).
        `site_env`: per site name, variables laid over `env` (what must differ between
        the sites, e.g. where each archives its journals)."""
        if a == b:
            raise ValueError(f"two sites need two names, got {a!r} twice")
        self.base_dir = Path(base_dir)
        password = _link_secret(self.base_dir / "link" / "leaf.secret")
        common = dict(site.pop("env", None) or {})
        envs = {name: {**common, **(site_env or {}).get(name, {})} for name in (a, b)}
        self.a = LocalSite(
            self.base_dir / a,
            site=a,
            site_index=0,
            domain=a,
            leaf_auth=(LEAF_USER, password),
            env=envs[a],
            **site,
        )
        self.links = []
        for i, server in enumerate(self.a.nats_servers, start=1):
            assert server.leaf_listen is not None
            link = LinkProxy(
                f"link-{b}-{a}-{i}", self.base_dir / "link" / f"{i}", server.leaf_listen.port
            )
            server.leaf_listen = replace(server.leaf_listen, advertise=link.url)
            self.links.append(link)
        # site b's leaf nodes verify site a's servers with a's CA (TLS through the proxy)
        remote = LeafRemote(
            tuple(link.url for link in self.links),
            LEAF_USER,
            password,
            ca_file=ca_path(self.a.credentials_dir) if self.a.tls else None,  # made at a's start
        )
        self.b = LocalSite(
            self.base_dir / b,
            site=b,
            site_index=1,
            domain=b,
            leaf_remotes=[remote],
            env=envs[b],
            **site,
        )

    @property
    def sites(self) -> tuple[LocalSite, LocalSite]:
        return self.a, self.b

    def site(self, name: str) -> LocalSite:
        for one in self.sites:
            if one.site == name:
                return one
        raise KeyError(f"no site {name!r} (sites: {self.a.site}, {self.b.site})")

    async def start(self) -> None:
        """Site a, the link, then site b (whose leaf nodes dial a through the link)."""
        try:
            await self.a.start()
            for link in self.links:
                await asyncio.to_thread(link.start)
            await self.b.start()
        except BaseException:
            self.stop()
            raise

    async def wait_ready(self, timeout: float = 60.0) -> None:
        await asyncio.gather(self.a.wait_ready(timeout), self.b.wait_ready(timeout))

    def stop(self) -> None:
        try:
            self.b.stop()
        finally:
            try:
                for link in self.links:
                    link.stop()
            finally:
                self.a.stop()

    @property
    def partitioned(self) -> bool:
        return all(link.is_cut for link in self.links)

    def partition(self) -> None:
        for link in self.links:
            link.cut()

    def heal(self) -> None:
        for link in self.links:
            link.heal()

    def linked(self) -> bool:
        """Every running server of site b has its leaf connection up."""
        servers = [server for server in self.b.nats_servers if server.running]
        return bool(servers) and all(server.varz().get("leafnodes") for server in servers)

    def link_state(self) -> str:
        """`cut` (partitioned on purpose), `up` (every leaf connection of site b is
        up) or `down` (open, but not connected: a site or server is down, or
        reconnecting)."""
        if self.partitioned:
            return "cut"
        return "up" if self.linked() else "down"

    async def __aenter__(self) -> SitePair:
        await self.start()
        await self.wait_ready()
        return self

    async def __aexit__(self, *_: object) -> None:
        self.stop()


def _link_secret(path: Path) -> str:
    """The leaf connection's password: made once, kept (0600) so restarts agree."""
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secret + "\n")
    return secret
