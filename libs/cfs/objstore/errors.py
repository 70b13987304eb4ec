"""The object store boundary's one exception root (STYLE.md #3).

Every error says in one line what was attempted, on which bucket/key, and why, so a
CLI prints `str(exc)` and a service logs it as is. Callers branch on the type:
`ObjectNotFound` (the key is absent), `NoSuchBucket` (the location is wrong or gone),
`ObjectStoreDenied` (credentials or policy: retrying will not help), and
`ObjectStoreUnavailable` (temporary failures outlasted the retry deadline).
"""

from __future__ import annotations


class ObjectStoreError(Exception):
    """A call to the object store failed; `str()` is one line for a human."""

    def __init__(self, message: str, *, bucket: str | None = None, key: str | None = None):
        super().__init__(message)
        self.bucket = bucket
        self.key = key


class ObjectNotFound(ObjectStoreError):
    """The object does not exist (GET of a missing key)."""


class NoSuchBucket(ObjectStoreError):
    """The bucket does not exist at this endpoint (create it, or fix the URL)."""


class ObjectStoreDenied(ObjectStoreError):
    """The store refused: bad or missing credentials, or a policy. Never retried."""


class ObjectStoreUnavailable(ObjectStoreError):
    """Connection failures, timeouts or 5xx/SlowDown answers for longer than the retry
    deadline. `seconds` and `attempts` say how hard it was tried."""

    def __init__(
        self,
        message: str,
        *,
        bucket: str | None = None,
        key: str | None = None,
        seconds: float = 0.0,
        attempts: int = 0,
    ) -> None:
        super().__init__(message, bucket=bucket, key=key)
        self.seconds = seconds
        self.attempts = attempts
