"""Running coroutines so that nothing is left running: a failure, a cancel or closing
the client stops what was started with it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine, Iterable
from typing import Any, TypeVar

from ._errors import ClientClosedError

__all__ = ["InFlight", "cancel_and_wait", "gather_or_cancel"]

T = TypeVar("T")


class InFlight:
    """The calls a client is running, so that closing the client stops them first.

    Each call runs as a task of its own, which ``aclose`` cancels: its caller then gets
    ClientClosedError at once rather than waiting out a timeout (and aiohttp does not
    wake a body read when its session closes under it: a download would wait forever).
    ``aclose`` waits until each has cleaned up (a download's ``.part`` file is gone).
    """

    def __init__(self, what: str) -> None:
        self._what = what
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    async def run(self, job: Awaitable[T]) -> T:
        """Run ``job`` as a call that ``aclose`` can stop with ClientClosedError."""
        if self._closed:
            if isinstance(job, Coroutine):
                job.close()  # never awaited, on purpose: no warning for it
            raise ClientClosedError("this NanoBananaClient is closed")
        task = asyncio.ensure_future(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            # Cancelling the caller cancels the task and waits for it to clean up.
            return await task
        except asyncio.CancelledError:
            caller = asyncio.current_task()
            closed_under_us = self._closed and task.cancelled()
            if closed_under_us and (caller is None or not caller.cancelling()):
                raise ClientClosedError(
                    f"the NanoBananaClient was closed during the {self._what}",
                    request_sent=True,  # under way: it may have gone out
                ) from None
            raise

    async def aclose(self) -> None:
        """Cancel every call still running and wait until each has cleaned up."""
        self._closed = True
        await cancel_and_wait(self._tasks)


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended, through further cancels of
    the caller (a second Ctrl-C): each cancels them again, none is left running behind.
    The caller's own cancel is raised once they all have ended."""
    stopped = False
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            stopped = True
    if stopped:
        raise asyncio.CancelledError


async def gather_or_cancel(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Results in order; on the first failure (or a cancel) cancel the rest, then raise.

    Plain ``asyncio.gather`` leaves the others running after a failure: requests and
    downloads nobody waits for any more.
    """
    jobs = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*jobs))
    except BaseException:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        raise
