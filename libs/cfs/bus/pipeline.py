"""Pipelined JetStream publishes over one reply subscription.

nats-py's `publish_async` spends more per message than the append itself
costs the server on a small event (a semaphore wait with a timeout task, a
random token, a PubAck dataclass per ack). This keeps a counter token, a
dict of futures and one window event; acks parse straight into `Ack`. Used by
both the single and the batch publish paths of the bus.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import nats.js.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

_NO_RESPONDERS = "503"


@dataclass(frozen=True)
class Ack:
    """Where an event landed. `duplicate` means an earlier attempt already stored it."""

    stream: str
    seq: int
    duplicate: bool


class AckPipeline:
    def __init__(self, nc: NATS, window: int) -> None:
        self._nc = nc
        self._window = window
        self._prefix = ""
        self._prefix_len = 0
        self._counter = 0
        self._pending: dict[str, asyncio.Future[Ack]] = {}
        self._room = asyncio.Event()
        self._room.set()

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    async def send(self, subject: str, data: bytes, headers: dict[str, str]) -> asyncio.Future[Ack]:
        """Publish with a reply subject; the future resolves with the stream's ack."""
        if not self._prefix:
            prefix = f"{self._nc.new_inbox()}."
            await self._nc.subscribe(prefix + "*", cb=self._on_reply)
            self._prefix, self._prefix_len = prefix, len(prefix)
        while len(self._pending) >= self._window:
            self._room.clear()
            await self._room.wait()
        self._counter += 1
        token = str(self._counter)
        future: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        self._pending[token] = future
        try:
            await self._nc.publish(subject, data, reply=self._prefix + token, headers=headers)
        except BaseException:
            self._pending.pop(token, None)
            raise
        return future

    def forget_done(self) -> None:
        """Drop futures that were cancelled (timed out), freeing their window slots."""
        self._pending = {t: f for t, f in self._pending.items() if not f.done()}
        if len(self._pending) < self._window:
            self._room.set()

    async def _on_reply(self, msg: Msg) -> None:
        future = self._pending.pop(msg.subject[self._prefix_len :], None)
        if len(self._pending) < self._window:
            self._room.set()
        if future is None or future.done():
            return
        if msg.headers and msg.headers.get("Status") == _NO_RESPONDERS:
            future.set_exception(nats.js.errors.NoStreamResponseError())
            return
        try:
            resp = json.loads(msg.data)
        except ValueError:
            future.set_exception(nats.js.errors.APIError(description="unreadable ack"))
            return
        error = resp.get("error")
        if error is not None:
            future.set_exception(
                nats.js.errors.APIError(
                    code=error.get("code"),
                    err_code=error.get("err_code"),
                    description=error.get("description"),
                    stream=resp.get("stream"),
                )
            )
        else:
            future.set_result(Ack(resp["stream"], resp["seq"], bool(resp.get("duplicate"))))
