"""A client of two replicated sites writes to the active one (DESIGN.md §8).

Both sites keep the `geo.active` record (`cfs_contracts.geo.ActiveSite`); a client
configured with its peer site (`ClientSettings.peer`) holds a connection to each,
reads the record on every site it reaches once a second (`SiteFollower`), and moves
to the site the newest record names (`choose_site`, pure). When the active site stops
answering the client stays where it is until the standby has taken over (the
geo-replicator's automatic failover, or `cfs admin failover`), so clients do not
split their writes over the two sites because of their own network trouble.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats.errors
import nats.js.errors

from cfs.bus import Bus, BusError
from cfs.geo import read_active
from cfs_contracts.geo import ActiveSite, newest_active
from cfs_contracts.streams import NODES

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0
TRANSPORT = (BusError, nats.errors.Error, nats.js.errors.Error, TimeoutError, OSError)

Connect = Callable[[str], Awaitable[Bus]]  # site -> a connected bus (BusError if none)
Switch = Callable[[Bus], Awaitable[None]]


@dataclass(frozen=True)
class Choice:
    site: str | None  # None: no site answers
    reason: str


def choose_site(current: str | None, home: str, records: dict[str, ActiveSite | None]) -> Choice:
    """`records`: the record of each site that answered (None: it has none)."""
    newest = newest_active(records.values())
    if newest is not None and newest.site in records:
        return Choice(newest.site, f"site {newest.site} is active (epoch {newest.epoch})")
    if newest is not None and current in records:
        return Choice(current, f"active site {newest.site} does not answer; staying on {current}")
    if newest is not None:
        return Choice(None, f"active site {newest.site} does not answer")
    for site in (current, home, *sorted(records)):
        if site is not None and site in records:
            return Choice(site, "no active site recorded")
    return Choice(None, "no site answers")


class SiteFollower:
    """Connections to both sites and the choice between them, checked every `every_s`."""

    def __init__(
        self, home: str, peer: str, connect: Connect, on_switch: Switch, every_s: float = 1.0
    ) -> None:
        self.home = home
        self.sites = (home, peer)
        self.connect = connect
        self.on_switch = on_switch
        self.every_s = every_s
        self.buses: dict[str, Bus] = {}
        self.current: str | None = None

    @property
    def bus(self) -> Bus:
        assert self.current is not None, "start() first"
        return self.buses[self.current]

    async def start(self, timeout: float = 30.0) -> Bus:
        """Connect and choose the first site (the active one, else whichever answers)."""
        async with asyncio.timeout(timeout):
            while True:
                choice = choose_site(None, self.home, await self._records())
                if choice.site is not None:
                    self.current = choice.site
                    log.info("client.site", extra={"site": choice.site, "reason": choice.reason})
                    return self.bus
                await asyncio.sleep(self.every_s)

    async def run(self) -> None:
        """Follow the record; `on_switch` gets the new site's bus."""
        while True:
            await asyncio.sleep(self.every_s)
            choice = choose_site(self.current, self.home, await self._records())
            if choice.site is None or choice.site == self.current:
                continue
            log.warning(
                "client.site_switched",
                extra={"from": self.current, "to": choice.site, "reason": choice.reason},
            )
            await self.on_switch(self.buses[choice.site])
            self.current = choice.site

    async def close(self) -> None:
        for bus in self.buses.values():
            with contextlib.suppress(*TRANSPORT):
                await bus.close()
        self.buses.clear()

    async def _records(self) -> dict[str, ActiveSite | None]:
        """The record of each site that answers, both asked at once (a dead site's
        connect timeout does not delay reading the live one)."""
        answers = await asyncio.gather(*(self._record(site) for site in self.sites))
        return {site: record for site, (ok, record) in zip(self.sites, answers, strict=True) if ok}

    async def _record(self, site: str) -> tuple[bool, ActiveSite | None]:
        try:
            bus = self.buses.get(site)
            if bus is None:  # `connect` gives up on its own (its connect timeout)
                bus = self.buses[site] = await self.connect(site)
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                record, _ = await read_active(await bus.key_value(NODES.bucket))
        except TRANSPORT:
            return False, None
        return True, record
