"""`S3Url`: what parses, what is refused (with one message naming why), and that a
parsed URL prints back as itself."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cfs.objstore import S3Url, is_s3_url


@pytest.mark.parametrize(
    ("text", "bucket", "prefix"),
    [
        ("s3://backups", "backups", ""),
        ("s3://backups/", "backups", ""),
        ("s3://backups/site-a", "backups", "site-a"),
        ("s3://backups/site-a/journal/", "backups", "site-a/journal"),
        ("s3://backups//site-a///journal", "backups", "site-a/journal"),
        ("s3://my.bucket-1/a b/ c ", "my.bucket-1", "a b/ c "),
    ],
)
def test_parse(text: str, bucket: str, prefix: str) -> None:
    url = S3Url.parse(text)
    assert (url.bucket, url.prefix) == (bucket, prefix)
    assert S3Url.parse(str(url)) == url


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("backups/site-a", "the scheme must be s3:// (got no scheme)"),
        ("https://backups/x", "the scheme must be s3:// (got https://)"),
        (" s3://backups", "the scheme must be s3:// (got  s3://)"),
        ("S3://backups", "the scheme must be s3:// (got S3://)"),
        ("s3://", "no bucket"),
        ("s3:///prefix", "no bucket"),
        ("s3://Backups", "'Backups' is not a bucket name"),
        ("s3://my_bucket/x", "'my_bucket' is not a bucket name"),
        ("s3://ab", "'ab' is not a bucket name"),
        ("s3://-bucket", "is not a bucket name"),
        ("s3://a..b", "is not a bucket name"),
        ("s3://bucket/a\nb", "control characters"),
    ],
)
def test_parse_refuses_with_one_clear_message(text: str, why: str) -> None:
    with pytest.raises(ValueError) as err:
        S3Url.parse(text)
    message = str(err.value)
    assert why in message
    assert message.startswith("bad S3 URL ")
    assert message.endswith("expected s3://bucket[/prefix]")
    assert "\n" not in message.replace("\\n", "")


def test_key_and_child_join_with_one_slash() -> None:
    root = S3Url.parse("s3://backups/site-a")
    assert root.key() == "site-a"
    assert root.key("journal", "001/seg-1") == "site-a/journal/001/seg-1"
    assert root.key("/journal/", "", "/x") == "site-a/journal/x"
    assert S3Url.parse("s3://backups").key("a", "b") == "a/b"
    child = root.child("journal/", "001")
    assert child == S3Url("backups", "site-a/journal/001")
    assert str(child) == "s3://backups/site-a/journal/001"
    assert str(S3Url("backups")) == "s3://backups"


def test_constructor_keeps_the_invariants() -> None:
    with pytest.raises(ValueError, match="leading, trailing or doubled slash"):
        S3Url("backups", "/x")
    with pytest.raises(ValueError, match="leading, trailing or doubled slash"):
        S3Url("backups", "a//b")
    with pytest.raises(ValueError, match="not a bucket name"):
        S3Url("B")
    with pytest.raises(AttributeError):
        S3Url("backups").bucket = "other"  # type: ignore[misc]


def test_is_s3_url_looks_at_the_scheme_only() -> None:
    assert is_s3_url("s3://backups/x")
    assert is_s3_url("s3://Bad_Bucket")  # refused later by parse, with its reason
    assert not is_s3_url("/tmp/export.json")
    assert not is_s3_url("backups/s3://x")


buckets = st.from_regex(r"[a-z0-9][a-z0-9-]{1,30}[a-z0-9]", fullmatch=True)
segments = st.text(
    st.characters(blacklist_categories=("Cc", "Cs"), blacklist_characters="/"), min_size=1
) | st.sampled_from([" ", " x ", "..", "."])


@given(buckets, st.lists(segments, max_size=5))
def test_round_trip(bucket: str, parts: list[str]) -> None:
    url = S3Url(bucket, "/".join(parts))
    text = str(url)
    assert is_s3_url(text)
    assert S3Url.parse(text) == url
    assert S3Url.parse(text + "/") == url


@given(buckets, st.lists(segments, max_size=3), st.lists(segments, min_size=1, max_size=3))
def test_child_is_the_key_as_a_url(bucket: str, root: list[str], parts: list[str]) -> None:
    url = S3Url(bucket, "/".join(root))
    child = url.child(*parts)
    assert child.bucket == bucket
    assert child.prefix == url.key(*parts)
    assert str(child) == f"s3://{bucket}/{url.key(*parts)}"
