"""SWIM's wire vocabulary: gossip updates, member rows and messages (encoded by `codec`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from cfs_contracts.members import Liveness

Addr = tuple[str, int]


# -- updates (gossip) ----------------------------------------------------------------------
@dataclass(frozen=True)
class Alive:
    node: str
    incarnation: int
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Suspect:
    node: str
    incarnation: int
    by: str


@dataclass(frozen=True)
class Dead:
    node: str
    incarnation: int
    by: str


@dataclass(frozen=True)
class Left:
    node: str
    incarnation: int


Update = Alive | Suspect | Dead | Left


@dataclass(frozen=True)
class MemberInfo:
    """One row of a `Sync`: what the sender believes about a member."""

    node: str
    state: Liveness
    incarnation: int
    host: str
    port: int
    labels: dict[str, str] = field(default_factory=dict)


# -- messages ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ping:
    seq: int
    sender: str
    target: str
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Ack:
    seq: int
    sender: str
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class PingReq:
    seq: int
    sender: str
    target: str
    host: str
    port: int
    nack_ms: int
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Nack:
    seq: int
    sender: str
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Gossip:
    sender: str
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Join:
    sender: str
    gossip: tuple[Update, ...] = ()


@dataclass(frozen=True)
class Sync:
    sender: str
    members: tuple[MemberInfo, ...]
    reply: bool
    gossip: tuple[Update, ...] = ()


Message = Ping | Ack | PingReq | Nack | Gossip | Join | Sync
