"""Key listing for KV buckets that does not lie under load."""

from __future__ import annotations

from cfs.bus.connection import Bus


async def bucket_keys(
    bus: Bus, bucket: str, prefix: str = "", site: str | None = None
) -> list[str]:
    """Keys (starting with `prefix`) from the bucket stream's subject counts: one API
    call, unlike nats-py's `kv.keys()`, whose watcher can report "no keys" when its
    messages race its consumer info. Deleted keys may be listed (their marker is the
    last message): read each one to know. `site`: the peer's bucket, over the link."""
    subjects = f"$KV.{bucket}."
    js = bus.js if site is None else bus.nc.jetstream(domain=site, timeout=5.0)
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=f"{subjects}{prefix}>")
    return sorted(s.removeprefix(subjects) for s in (info.state.subjects or {}))
