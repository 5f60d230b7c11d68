"""Running a few coroutines together so that one failure leaves nothing running."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

__all__ = ["gather_or_cancel"]

T = TypeVar("T")


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
