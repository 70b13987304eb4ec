"""Cancellation in services: a task that lost its cancel still ends (`cancel_and_wait`), and
no cancel is lost in the first place (`wait_for`, as Python 3.12 has it)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Awaitable, Callable

import pytest

from cfs.kernel.runtime import CANCEL_AGAIN_S, cancel_and_wait, wait_for


async def _swallows_one_cancel(ended: asyncio.Event) -> None:
    """What Python 3.11's wait_for does when a cancel lands as its result arrives: the
    cancellation is gone and the task carries on."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        ended.set()


async def test_a_task_that_swallowed_its_cancel_is_cancelled_again() -> None:
    ended = asyncio.Event()
    task = asyncio.create_task(_swallows_one_cancel(ended))
    await asyncio.sleep(0)
    started = time.monotonic()
    await cancel_and_wait(task)
    assert task.cancelled() and ended.is_set()
    assert time.monotonic() - started < CANCEL_AGAIN_S + 1.0


async def test_an_ended_or_missing_task_returns_at_once() -> None:
    await cancel_and_wait(None)
    done = asyncio.create_task(asyncio.sleep(0))
    await done
    await cancel_and_wait(done)
    assert done.done() and not done.cancelled()


async def test_the_callers_own_cancellation_is_not_swallowed() -> None:
    ended = asyncio.Event()
    slow = asyncio.create_task(_swallows_one_cancel(ended))
    await asyncio.sleep(0)
    caller = asyncio.create_task(cancel_and_wait(slow))
    await asyncio.sleep(0.01)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await cancel_and_wait(slow)
    assert ended.is_set()


async def _cancelled_as_the_result_arrives(
    wait_for: Callable[[Awaitable[int], float | None], Awaitable[int]],
) -> asyncio.Task[int]:
    """A task waiting in `wait_for` is cancelled in the same loop step as its result is
    set, as when a nats-py reply lands while a service stops."""
    result: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def waiting() -> int:
        return await wait_for(result, 10.0)

    task = asyncio.create_task(waiting())
    await asyncio.sleep(0)
    result.set_result(1)
    task.cancel()
    await asyncio.wait([task])
    return task


async def test_the_cancellable_wait_for_never_loses_a_cancellation() -> None:
    task = await _cancelled_as_the_result_arrives(wait_for)
    assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="fixed in Python 3.12")
async def test_python_3_11_wait_for_loses_it_which_is_why_services_replace_it() -> None:
    task = await _cancelled_as_the_result_arrives(asyncio.wait_for)
    assert not task.cancelled() and task.result() == 1


async def test_the_cancellable_wait_for_times_out_like_the_standard_one() -> None:
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.sleep(10), 0.01)
    with pytest.raises(TimeoutError):
        await wait_for(asyncio.sleep(10), 0)
    assert await wait_for(asyncio.sleep(0, "done"), None) == "done"
