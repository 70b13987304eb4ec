"""`Link`: a request waiting when the connection comes back is interrupted and its
task's cancellation taken back, never leaking into what the task does next."""

from __future__ import annotations

import asyncio
import time

import pytest

from cfs.bus.connection import Link


async def _waiting_request(link: Link, reply: asyncio.Future[str]) -> str:
    """`Link.ask` as `Bus.request` uses it, against a future as the reply."""
    attempts = 0

    async def attempt(left: float) -> str:
        nonlocal attempts
        attempts += 1
        return await asyncio.wait_for(asyncio.shield(reply), left)

    got = await link.ask(attempt, time.monotonic() + 5)
    return f"{got} after {attempts} attempts"


async def test_a_kicked_request_asks_again_and_its_task_is_not_left_cancelled() -> None:
    link = Link()
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_waiting_request(link, reply))
    await asyncio.sleep(0.01)
    link.reconnected()
    await asyncio.sleep(0.01)
    reply.set_result("pong")
    assert await task == "pong after 2 attempts"
    assert task.cancelling() == 0 and not link.kicked and not link.waiting


async def test_a_kick_that_arrives_with_the_reply_is_taken_back() -> None:
    link = Link()
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def then_sleep() -> str:
        got = await _waiting_request(link, reply)
        async with asyncio.timeout(0.05):  # would be cut short by a leaked cancellation
            await asyncio.sleep(0.01)
        return got

    task = asyncio.ensure_future(then_sleep())
    await asyncio.sleep(0.01)
    reply.set_result("pong")  # the task is woken up ...
    link.reconnected()  # ... and kicked before it runs
    result = await task
    assert result.startswith("pong") and task.cancelling() == 0 and not link.kicked


async def test_a_cancellation_of_the_caller_is_never_swallowed() -> None:
    link = Link()
    reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(_waiting_request(link, reply))
    await asyncio.sleep(0.01)
    task.cancel()
    link.reconnected()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not link.kicked
