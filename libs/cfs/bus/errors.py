"""Typed bus errors. Each message names what failed and where, for humans.

Library exceptions from nats-py are translated here, at the boundary, so that
callers (services, CLI) see one root (`BusError`) and never a traceback from
deep inside the client.
"""

from __future__ import annotations

# What NATS says when credentials are refused or lack a permission (server -ERR texts).
_DENIED = ("permissions violation", "authorization violation", "authorization error")


def is_permission_error(text: str) -> bool:
    lowered = text.lower()
    return any(marker in lowered for marker in _DENIED)


class BusError(Exception):
    """Root of every bus failure."""

    #: True when retrying the same operation later may succeed.
    temporary: bool = False


class BusUnavailable(BusError):
    """No NATS server could be reached (or the connection is closed)."""

    temporary = True


class SequenceConflict(BusError):
    """Expected-last-sequence did not match: another writer appended first."""

    def __init__(self, stream: str, subject: str, expected: int, detail: str) -> None:
        super().__init__(stream, subject, expected, detail)
        self.stream = stream
        self.subject = subject
        self.expected = expected
        self.detail = detail

    def __str__(self) -> str:
        return (
            f"sequence conflict on stream {self.stream} ({self.subject}): expected last "
            f"sequence {self.expected}, {self.detail}"
        )


class PublishFailed(BusError):
    """The server refused an append for a reason other than a sequence conflict."""


class PublishTimeout(BusError):
    """No acknowledgement within the deadline; the event may or may not be stored.

    Retrying with the same event id is safe: the stream deduplicates it.
    """

    temporary = True


class PayloadTooLarge(BusError):
    pass


class RequestTimeout(BusError):
    temporary = True

    def __init__(self, subject: str, timeout: float) -> None:
        super().__init__(f"no reply on {subject} within {timeout:g}s")
        self.subject = subject
        self.timeout = timeout


class NoResponders(BusError):
    temporary = True

    def __init__(self, subject: str) -> None:
        super().__init__(f"no service is listening on {subject}")
        self.subject = subject


class ProvisionError(BusError):
    """A stream, consumer or bucket could not be created or updated."""
