"""`s3://bucket/prefix` as a value: parsed once, checked once, joined without slash slips."""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "s3://"
# S3's bucket naming rules (also MinIO's): 3-63 lowercase letters, digits, dots and
# hyphens, starting and ending with a letter or digit.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_EXPECTED = "expected s3://bucket[/prefix]"


def is_s3_url(text: str) -> bool:
    """Does `text` name an object store location (rather than a local path)?

    Only the scheme is looked at, so a mistyped `s3://` target is refused by
    `S3Url.parse` with its reason instead of becoming a local file named `s3:`."""
    return text.startswith(SCHEME)


def _bad(text: str, why: str) -> ValueError:
    return ValueError(f"bad S3 URL {text!r}: {why}; {_EXPECTED}")


def _bucket_problem(bucket: str) -> str | None:
    if _BUCKET.match(bucket) and ".." not in bucket:
        return None
    return f"{bucket!r} is not a bucket name (3-63 lowercase letters, digits, dots and hyphens)"


def _segments(text: str) -> list[str]:
    return [part for part in text.split("/") if part]


@dataclass(frozen=True)
class S3Url:
    """A bucket and a key prefix. `prefix` has no leading, trailing or doubled slash;
    "" is the bucket's root."""

    bucket: str
    prefix: str = ""

    def __post_init__(self) -> None:
        if (why := _bucket_problem(self.bucket)) is not None:
            raise _bad(f"{SCHEME}{self.bucket}", why)
        if self.prefix != "/".join(_segments(self.prefix)):
            raise _bad(str(self), "the prefix has a leading, trailing or doubled slash")
        if _CONTROL.search(self.prefix):
            raise _bad(str(self), "control characters in the prefix")

    @classmethod
    def parse(cls, text: str) -> S3Url:
        """`s3://bucket`, `s3://bucket/some/prefix/` -> S3Url; ValueError names what is
        wrong (empty, another scheme, no or a bad bucket)."""
        if not isinstance(text, str) or not text.strip():
            raise _bad(str(text) if isinstance(text, str) else repr(text), "empty")
        if not text.startswith(SCHEME):
            scheme = text.split("://", 1)[0] + "://" if "://" in text else "no scheme"
            raise _bad(text, f"the scheme must be s3:// (got {scheme})")
        bucket, _, rest = text[len(SCHEME) :].partition("/")
        if not bucket:
            raise _bad(text, "no bucket")
        if (why := _bucket_problem(bucket)) is not None:
            raise _bad(text, why)
        if _CONTROL.search(rest):
            raise _bad(text, "control characters in the prefix")
        return cls(bucket, "/".join(_segments(rest)))

    def key(self, *parts: str) -> str:
        """The object key of `parts` under this prefix: `url.key("a", "b.json")` is
        `prefix/a/b.json` (slashes around each part are dropped, empty parts skipped)."""
        joined = [self.prefix, *(part.strip("/") for part in parts)]
        return "/".join(part for part in joined if part)

    def child(self, *parts: str) -> S3Url:
        """The location `parts` below this one (for a sub-store: `url.child("journal")`)."""
        return S3Url(self.bucket, "/".join(_segments(self.key(*parts))))

    def __str__(self) -> str:
        return f"{SCHEME}{self.bucket}/{self.prefix}" if self.prefix else f"{SCHEME}{self.bucket}"
