"""The SWIM wire format: compact JSON, authenticated with the cluster token.

A datagram is `b"S1"`, then HMAC-SHA256(token, b"S1" + body) (32 bytes), then the
body: one JSON object with short keys. A member without the token can neither
join nor inject updates: its datagrams fail the MAC check and are dropped (the
runner counts them). The token itself is never logged or sent.

Updates are arrays: `["a", node, inc, host, port, labels]` (alive),
`["s", node, inc, by]`, `["d", node, inc, by]`, `["l", node, inc]`; `Sync` rows
are `[state, node, inc, host, port, labels]` with state one of a/s/d/l.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from cfs_contracts.members import Liveness
from cfs_membership.messages import (
    Ack,
    Alive,
    Dead,
    Gossip,
    Join,
    Left,
    MemberInfo,
    Message,
    Nack,
    Ping,
    PingReq,
    Suspect,
    Sync,
    Update,
)

MAGIC = b"S1"
MAC_BYTES = 32
MAX_DATAGRAM = 65_000

_STATE_CODE = {
    Liveness.ALIVE: "a",
    Liveness.SUSPECT: "s",
    Liveness.DOWN: "d",
    Liveness.LEFT: "l",
}
_CODE_STATE = {code: state for state, code in _STATE_CODE.items()}


class CodecError(ValueError):
    """A datagram we drop; `reason` is a counter name."""

    reason = "malformed"


class BadMac(CodecError):
    reason = "bad_mac"


class Malformed(CodecError):
    reason = "malformed"


class Codec:
    """Encode and decode messages for one cluster (keyed by its token)."""

    def __init__(self, token: bytes) -> None:
        self._key = token

    def __repr__(self) -> str:  # never show the token
        return "<Codec>"

    def encode(self, message: Message) -> bytes:
        body = json.dumps(_message(message), separators=(",", ":")).encode()
        return MAGIC + self._mac(body) + body

    def decode(self, data: bytes) -> Message:
        if len(data) < len(MAGIC) + MAC_BYTES or not data.startswith(MAGIC):
            raise Malformed(f"not a SWIM datagram ({len(data)} bytes)")
        mac = data[len(MAGIC) : len(MAGIC) + MAC_BYTES]
        body = data[len(MAGIC) + MAC_BYTES :]
        if not hmac.compare_digest(mac, self._mac(body)):
            raise BadMac("message authentication failed (wrong cluster token?)")
        try:
            return _parse(json.loads(body))
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise Malformed(f"undecodable SWIM message: {exc}") from None

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, MAGIC + body, hashlib.sha256).digest()


# -- encoding --------------------------------------------------------------------------------
def _update(update: Update) -> list[Any]:
    if isinstance(update, Alive):
        return ["a", update.node, update.incarnation, update.host, update.port, update.labels]
    if isinstance(update, Suspect):
        return ["s", update.node, update.incarnation, update.by]
    if isinstance(update, Dead):
        return ["d", update.node, update.incarnation, update.by]
    return ["l", update.node, update.incarnation]


def _message(message: Message) -> dict[str, Any]:
    out: dict[str, Any]
    if isinstance(message, Ping):
        out = {"t": "ping", "q": message.seq, "n": message.target}
    elif isinstance(message, Ack):
        out = {"t": "ack", "q": message.seq}
    elif isinstance(message, PingReq):
        out = {
            "t": "preq",
            "q": message.seq,
            "n": message.target,
            "h": message.host,
            "p": message.port,
            "w": message.nack_ms,
        }
    elif isinstance(message, Nack):
        out = {"t": "nack", "q": message.seq}
    elif isinstance(message, Gossip):
        out = {"t": "gossip"}
    elif isinstance(message, Join):
        out = {"t": "join"}
    else:
        out = {
            "t": "sync",
            "r": message.reply,
            "m": [
                [_STATE_CODE[m.state], m.node, m.incarnation, m.host, m.port, m.labels]
                for m in message.members
            ],
        }
    out["f"] = message.sender
    if message.gossip:
        out["g"] = [_update(update) for update in message.gossip]
    return out


# -- decoding (strict: a valid MAC does not make a message well-formed) ----------------------
def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def _int(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise TypeError(f"expected a non-negative integer, got {value!r}")
    return value


def _port(value: Any) -> int:
    port = _int(value)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} out of range")
    return port


def _labels(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise TypeError("labels must be an object")
    return {_str(k): _str(v) for k, v in value.items()}


def _parse_update(raw: Any) -> Update:
    if not isinstance(raw, list) or not raw:
        raise TypeError("an update must be a non-empty array")
    kind = raw[0]
    if kind == "a" and len(raw) == 6:
        return Alive(_str(raw[1]), _int(raw[2]), _str(raw[3]), _port(raw[4]), _labels(raw[5]))
    if kind == "s" and len(raw) == 4:
        return Suspect(_str(raw[1]), _int(raw[2]), _str(raw[3]))
    if kind == "d" and len(raw) == 4:
        return Dead(_str(raw[1]), _int(raw[2]), _str(raw[3]))
    if kind == "l" and len(raw) == 3:
        return Left(_str(raw[1]), _int(raw[2]))
    raise ValueError(f"unknown update {kind!r} with {len(raw)} fields")


def _parse_member(raw: Any) -> MemberInfo:
    if not isinstance(raw, list) or len(raw) != 6:
        raise TypeError("a member row must be an array of 6")
    state = _CODE_STATE[_str(raw[0])]
    return MemberInfo(
        _str(raw[1]), state, _int(raw[2]), _str(raw[3]), _port(raw[4]), _labels(raw[5])
    )


def _parse(raw: Any) -> Message:
    if not isinstance(raw, dict):
        raise TypeError("a message must be an object")
    kind = _str(raw["t"])
    sender = _str(raw["f"])
    gossip_raw = raw.get("g", [])
    if not isinstance(gossip_raw, list):
        raise TypeError("gossip must be an array")
    gossip = tuple(_parse_update(item) for item in gossip_raw)
    if kind == "ping":
        return Ping(_int(raw["q"]), sender, _str(raw["n"]), gossip)
    if kind == "ack":
        return Ack(_int(raw["q"]), sender, gossip)
    if kind == "preq":
        return PingReq(
            _int(raw["q"]),
            sender,
            _str(raw["n"]),
            _str(raw["h"]),
            _port(raw["p"]),
            _int(raw["w"]),
            gossip,
        )
    if kind == "nack":
        return Nack(_int(raw["q"]), sender, gossip)
    if kind == "gossip":
        return Gossip(sender, gossip)
    if kind == "join":
        return Join(sender, gossip)
    if kind == "sync":
        rows = raw["m"]
        if not isinstance(rows, list):
            raise TypeError("sync members must be an array")
        reply = raw["r"]
        if not isinstance(reply, bool):
            raise TypeError("sync reply flag must be a boolean")
        return Sync(sender, tuple(_parse_member(row) for row in rows), reply, gossip)
    raise ValueError(f"unknown message type {kind!r}")
