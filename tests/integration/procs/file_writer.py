"""Write a file through the client library, flush it, say FSYNCED, then keep writing
another file until killed (kill -9 at an arbitrary moment of further work)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import sys
from pathlib import Path

from cfs.bus import Bus
from cfs.client import FileStore, MetadataClient
from cfs_contracts.fs.records import ROOT_INO


async def main(urls: list[str], site: str, size: int, credentials: Path | None) -> None:
    bus = await Bus.connect(urls, site=site, node="file-writer", credentials=credentials)
    meta = MetadataClient(bus)
    files = FileStore(bus, meta, client_id="file-writer")
    await files.start()
    data = random.Random(5).randbytes(size)
    inode = await meta.create(ROOT_INO, "fsynced")
    handle = await files.open(inode.ino)
    await handle.write(0, data)
    await handle.flush()
    print("FSYNCED", inode.ino, hashlib.sha256(data).hexdigest(), flush=True)
    other = await files.open((await meta.create(ROOT_INO, "in-flight")).ino)
    offset = 0
    while True:  # unflushed work that the kill interrupts
        await other.write(offset, random.randbytes(1 << 20))
        offset += 1 << 20


if __name__ == "__main__":
    credentials = Path(sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3]), credentials))
