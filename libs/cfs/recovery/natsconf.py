"""nats-server config text for an operator-run quorum recovery (pure: text in, text out).

The survivor's own config stays as it is. The recovery writes files that `include` it
(or, under Nomad, are appended to it) and override whole top-level entries after it: in
the nats-server config format a key given twice takes its last value (checked with
nats-server 2.14), so `cluster { ... }` after the include replaces the original block.
To keep what the operator configured inside a block (listen address, TLS), the
original block is read here and only its `name` and `routes` (or `store_dir`) change.

The scanner understands what nats-server configs written by people and by `cfs` use:
`key: value`, `key = value`, `key value`, `key { ... }`, `[ ... ]`, quoted strings,
`#` and `//` comments. It is not a full parser: a value it cannot read (a variable
reference, say) is left as it is and reported as unknown where it matters.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_OPEN = {"{": "}", "[": "]"}


class NatsConfigError(ValueError):
    """The survivor's config cannot be read for what the recovery must change."""


@dataclass(frozen=True)
class Entry:
    """One `key value` at the top of a config text (or a block's body)."""

    key: str
    value: str  # as written: a block keeps its braces, a string its quotes
    start: int
    end: int

    @property
    def body(self) -> str | None:
        """The inside of a `{ ... }` value, None for anything else."""
        if self.value.startswith("{") and self.value.endswith("}"):
            return self.value[1:-1]
        return None

    @property
    def scalar(self) -> str:
        """The value without its quotes (a quoted string is decoded)."""
        value = self.value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            try:
                decoded: str = json.loads(value)
                return decoded
            except ValueError:
                return value[1:-1]
        if value.startswith("'") and value.endswith("'") and len(value) >= 2:
            return value[1:-1]
        return value


def entries(text: str) -> list[Entry]:
    """The entries of `text` at depth 0, in order (comments skipped)."""
    found: list[Entry] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n,;":
            i += 1
            continue
        if _comment(text, i):
            i = _line_end(text, i)
            continue
        start = i
        if c in "\"'":
            end = _string_end(text, i)
            key = text[i + 1 : end - 1]
            i = end
        else:
            while i < n and text[i] not in " \t\r\n:={[,;#":
                i += 1
            key = text[start:i]
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] in ":=":
            i += 1
            while i < n and text[i] in " \t":
                i += 1
        value_start = i
        if i < n and text[i] in _OPEN:
            i = _close(text, i)
        else:
            while i < n and text[i] not in "\r\n,;#}":
                i = _string_end(text, i) if text[i] in "\"'" else i + 1
        value = text[value_start:i].strip()
        found.append(Entry(key, value, start, i))
    return found


def find(text: str, key: str) -> Entry | None:
    """The last entry named `key` (the one nats-server uses)."""
    named = [entry for entry in entries(text) if entry.key == key]
    return named[-1] if named else None


def block(text: str, key: str) -> str | None:
    """The body of the block `key { ... }` at the top of `text`, None when absent."""
    entry = find(text, key)
    return None if entry is None else entry.body


def rewrite_block(body: str, values: dict[str, str]) -> str:
    """`body` without its entries named in `values`, then those entries (values as
    written: quote them with `quote`). Comments and the other entries are kept."""
    kept = body
    for entry in sorted(
        (e for e in entries(body) if e.key in values), key=lambda e: e.start, reverse=True
    ):
        kept = kept[: entry.start] + kept[entry.end :]
    lines = [line for line in kept.splitlines() if line.strip()]
    lines += [f"  {_key(key)}: {value}" for key, value in values.items()]
    return "\n".join(lines)


def _key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", key) else quote(key)


def quote(value: str) -> str:
    """A double-quoted config string (the format accepts JSON string escapes)."""
    return json.dumps(value)


def quote_list(values: list[str]) -> str:
    return "[" + ", ".join(quote(v) for v in values) + "]"


def host_port(listen: str, default_port: int) -> tuple[str, int]:
    """`host:port`, `port` or `nats://host:port` -> (host, port)."""
    raw = re.sub(r"^[a-z-]+://", "", listen.strip())
    host, sep, port = raw.rpartition(":")
    if not sep:
        return (raw, default_port) if not raw.isdigit() else ("0.0.0.0", int(raw))
    try:
        return host or "0.0.0.0", int(port)
    except ValueError:
        raise NatsConfigError(f"cannot read the address {listen!r}") from None


@dataclass(frozen=True)
class ServerConfig:
    """What the recovery needs from the survivor's config."""

    server_name: str | None
    store_dir: str | None
    cluster_body: str
    cluster_port: int
    jetstream_body: str
    accounts_body: str | None


def read_server_config(text: str) -> ServerConfig:
    """The survivor's config as the recovery sees it; one error naming what is missing."""
    cluster = find(text, "cluster")
    if cluster is None or cluster.body is None:
        raise NatsConfigError("no `cluster { ... }` block: the server is not clustered")
    listen = find(cluster.body, "listen")
    port_entry = find(cluster.body, "port")
    if listen is not None:
        _, port = host_port(listen.scalar, 6222)
    elif port_entry is not None and port_entry.scalar.isdigit():
        port = int(port_entry.scalar)
    else:
        port = 6222
    jetstream = find(text, "jetstream")
    js_body = jetstream.body if jetstream is not None and jetstream.body is not None else ""
    store = find(js_body, "store_dir") or find(js_body, "store")
    name = find(text, "server_name")
    accounts = find(text, "accounts")
    return ServerConfig(
        server_name=name.scalar if name else None,
        store_dir=store.scalar if store else None,
        cluster_body=cluster.body,
        cluster_port=port,
        jetstream_body=js_body,
        accounts_body=accounts.body if accounts is not None else None,
    )


def accounts_with_system_user(accounts_body: str | None, user: str, password: str) -> str:
    """An `accounts` block: the original's accounts plus a `$SYS` user (the account
    that may remove a JetStream meta peer)."""
    sys_users = f"{{ users = [{{user: {quote(user)}, password: {quote(password)}}}] }}"
    body = rewrite_block(accounts_body or "", {"$SYS": sys_users})
    return "accounts {\n" + body + "\n}"


def cluster_override(config: ServerConfig, name: str, routes: list[str]) -> str:
    body = rewrite_block(config.cluster_body, {"name": quote(name), "routes": quote_list(routes)})
    return "cluster {\n" + body + "\n}"


def _comment(text: str, i: int) -> bool:
    """`#`, or `//` at the start of a token (not the `//` of `nats-route://host`)."""
    if text[i] == "#":
        return True
    return text.startswith("//", i) and (i == 0 or text[i - 1] in " \t\r\n{[,;")


def _line_end(text: str, i: int) -> int:
    end = text.find("\n", i)
    return len(text) if end < 0 else end


def _string_end(text: str, i: int) -> int:
    """Index after the string that starts at `i`."""
    quote_char = text[i]
    j = i + 1
    while j < len(text):
        if text[j] == "\\" and quote_char == '"':
            j += 2
            continue
        if text[j] == quote_char:
            return j + 1
        j += 1
    raise NatsConfigError(f"unterminated string at offset {i}")


def _close(text: str, i: int) -> int:
    """Index after the bracket that closes the one at `i` (strings and comments skipped)."""
    stack = [_OPEN[text[i]]]
    j = i + 1
    while j < len(text):
        c = text[j]
        if c in "\"'":
            j = _string_end(text, j)
            continue
        if _comment(text, j):
            j = _line_end(text, j)
            continue
        if c in _OPEN:
            stack.append(_OPEN[c])
        elif c == stack[-1]:
            stack.pop()
            if not stack:
                return j + 1
        j += 1
    raise NatsConfigError(f"unclosed {text[i]!r} at offset {i}")
