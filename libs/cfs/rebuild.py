"""Re-create fragments of one chunk from the fragments that survive (DESIGN.md §6).

Shared by the chunk-store (`rebuild` verb: a node rebuilds the fragments it is
to hold, reading the sources itself, so fragment data never detours through
the repair coordinator) and by anything else that must regenerate a fragment.
The decoded chunk is checked against its SHA-256 (the chunk id) whenever its
length is known, so a fragment that passed its own CRC but holds the wrong
bytes can never be copied into a new one.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence

from cfs.client.chunks import ChunkStoreClient, FragmentError, Unrecoverable, straggling_s
from cfs.erasure import Scheme, decode, encode_some
from cfs_contracts.data import fragment_key


async def gather(
    chunks: ChunkStoreClient,
    chunk_id: str,
    scheme: Scheme,
    holders: Mapping[int, str],
    have: Mapping[int, bytes] | None = None,
    on_error: Callable[[FragmentError], None] | None = None,
) -> dict[int, bytes]:
    """k healthy fragments (index -> bytes): those in `have` (read locally), then
    from `holders`, data fragments first, asking more as some fail (each failure
    passed to `on_error`), and one more whenever a request is still unanswered well
    after its siblings' answers (`straggling_s`: a holder stopped, not failed); the
    first k answers win. `Unrecoverable` when fewer than k answer."""
    got: dict[int, bytes] = dict(have or {})
    failures: list[str] = []
    pending = sorted(i for i in holders if i not in got)
    running: set[asyncio.Future[None]] = set()

    async def one(i: int) -> None:
        key = fragment_key(chunk_id, scheme.name, i)
        try:
            got[i] = await chunks.get(holders[i], key)
        except FragmentError as exc:
            failures.append(str(exc))
            if on_error is not None:
                on_error(exc)

    def ask(n: int) -> None:
        nonlocal pending
        running.update(asyncio.ensure_future(one(i)) for i in pending[:n])
        pending = pending[n:]

    started = answered_at = time.monotonic()
    try:
        while len(got) < scheme.k and (running or pending):
            if (short := scheme.k - len(got) - len(running)) > 0 and pending:
                ask(short)
                continue
            answered = answered_at > started
            grace = answered_at + straggling_s(answered_at - started) - time.monotonic()
            done, _ = await asyncio.wait(
                running,
                timeout=grace if answered and pending else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            running.difference_update(done)
            if done:
                answered_at = time.monotonic()
            else:  # a straggler: ask one more holder beside it
                ask(1)
                answered_at = time.monotonic()
    finally:
        for task in running:
            task.cancel()
    if len(got) < scheme.k:
        raise Unrecoverable(len(got), scheme.k, "; ".join(failures) or "no other holder")
    return dict(sorted(got.items())[: scheme.k]) if len(got) > scheme.k else got


async def rebuild_fragments(
    chunks: ChunkStoreClient,
    chunk_id: str,
    scheme: Scheme,
    wanted: Sequence[int],
    holders: Mapping[int, str],
    *,
    length: int | None,
    have: Mapping[int, bytes] | None = None,
) -> dict[int, bytes]:
    """Fragments `wanted` of the chunk, decoded from any k of `have` and `holders`.

    `length`: the chunk's coded length (the chunk map's `stored_length`); None
    when unknown (a scrub report names no file), which skips the SHA-256 check:
    the k source fragments have each passed their CRC on the way.
    """
    got = await gather(chunks, chunk_id, scheme, holders, have)
    return await asyncio.to_thread(_decode_and_encode, chunk_id, scheme, got, wanted, length)


def _decode_and_encode(
    chunk_id: str,
    scheme: Scheme,
    got: dict[int, bytes],
    wanted: Sequence[int],
    length: int | None,
) -> dict[int, bytes]:
    size = len(next(iter(got.values())))
    data = decode(scheme, got, size * scheme.k if length is None else length)
    if length is not None and hashlib.sha256(data).hexdigest() != chunk_id:
        raise Unrecoverable(len(got), scheme.k, "decoded chunk fails its SHA-256")
    return encode_some(scheme, data, wanted)
