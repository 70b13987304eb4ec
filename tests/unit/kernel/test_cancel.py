"""cancel_and_wait: a task that loses its cancellation still ends; ours is never lost."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cfs.kernel.runtime import CANCEL_AGAIN_S, cancel_and_wait


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
