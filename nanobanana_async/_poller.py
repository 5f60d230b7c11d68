"""The poll loop: every wait on one client shares it, and it reads many tasks per request.

Each watched task id has one entry, shared by all its waiters, with its own next-due
time that backs off from ``poll_interval`` to ``max_poll_interval``. When the soonest
entry is due, a round goes out: the due entries are split into ``retrieve_batch``
requests of ``batch_size`` ids, and the last request is topped up with the entries due
next, since a request costs the same for 1 id or 50. So the request rate follows
``ceil(pending / batch_size)``, not the number of waiters.

The loop runs as one asyncio task, started by the first waiter and stopped when the
last one leaves. Due times live in a heap, so a round costs work in proportion to the
entries it polls, not to all entries watched.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import inspect
import itertools
import logging
import random
from collections import OrderedDict
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Iterable
from typing import Any, NamedTuple, TypeVar

import backoff

from ._errors import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    NanoBananaError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from ._models import Task
from ._retry import RetryPolicy

__all__ = ["FetchBatch", "OnUpdate", "Poller", "Target", "call_on_update"]

logger = logging.getLogger("nanobanana_async")

#: Reads some task ids: (records by id, decode errors by id); unknown ids are absent.
FetchBatch = Callable[
    [list[str]], Awaitable[tuple[dict[str, Task], dict[str, ResponseDecodeError]]]
]
#: Called with a task's record each time it changes; may be a coroutine function.
OnUpdate = Callable[[Task], Any]


class Target(NamedTuple):
    """What a wait is on: a task id, whether a callback will announce it (poll it
    lazily), and the finished record if the caller already holds one (poll nothing)."""

    task_id: str
    lazy: bool = False
    known: Task | None = None

# Errors that no retry can mend: every waiter fails with them at once.
_FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError, BadRequestError)

# Each task's poll interval grows by this factor per unanswered poll, up to the cap.
# Gentler than doubling: a round reads up to batch_size tasks for the price of one,
# so frequent polls are cheap while the finish-to-return delay stays short.
_GROWTH = 1.5
_JITTER = 0.1  # +-10 %: spreads tasks submitted together without breaking batches up
_MAX_FAILURE_WAIT = 30.0  # cap on the loop's own backoff after failed rounds
_CONCURRENT_REQUESTS = 8  # batch requests of one round in flight at once
_RECENT_LIMIT = 1024  # callbacks remembered for waits not started yet

T = TypeVar("T")


class _Entry:
    """One watched task id, shared by all its waiters: schedule, last record, outcome.

    Kept small (10,000 waiters must cost under 3 KB each): waiters park on futures of
    their own in ``listeners``, woken at every record change and at the outcome.
    """

    __slots__ = (
        "attempt",
        "due",
        "last",
        "lazy",
        "listeners",
        "missing_since",
        "on_settle",
        "outcome",
        "refs",
        "scheduled",
        "task_id",
        "version",
    )

    def __init__(self, task_id: str, lazy: bool) -> None:
        self.task_id = task_id
        self.lazy = lazy
        self.refs = 0
        self.last: Task | None = None
        self.version = 0  # bumped at every change of ``last``
        self.outcome: Task | BaseException | None = None  # set once, when settled
        self.attempt = 0  # polls so far: the index into the poller's delays
        self.due = 0.0
        self.scheduled = False  # whether a live heap item stands for this entry
        self.missing_since: float | None = None
        self.listeners: list[asyncio.Future[None]] | None = None
        self.on_settle: list[Callable[[_Entry], None]] | None = None

    def next_change(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of the caller's own, resolved at the next change or the outcome."""
        future = loop.create_future()
        if self.listeners is None:
            self.listeners = [future]
        else:
            self.listeners.append(future)
        return future

    def drop(self, future: asyncio.Future[None]) -> None:
        """Forget a listener that stopped listening (its waiter was cancelled)."""
        if self.listeners is not None and future in self.listeners:
            self.listeners.remove(future)

    def update(self, task: Task) -> None:
        if task != self.last:
            self.last = task
            self.version += 1
            self._notify()

    def settle(self, outcome: Task | BaseException) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        self._notify()
        callbacks, self.on_settle = self.on_settle, None
        for callback in callbacks or ():
            callback(self)

    def _notify(self) -> None:
        listeners, self.listeners = self.listeners, None
        for future in listeners or ():
            if not future.done():
                future.set_result(None)


def _result(entry: _Entry) -> Task:
    """The settled outcome: the finished record, or a raise of a copy of its error.

    Many waiters may share one error; each raises its own copy, or the one instance's
    traceback would grow with every task it is raised in.
    """
    outcome = entry.outcome
    if isinstance(outcome, Task):
        return outcome
    assert outcome is not None
    try:
        error = copy.copy(outcome)
    except Exception:
        error = outcome.with_traceback(None)
    raise error


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class Poller:
    """The shared poll loop of one client, bound to the event loop it first ran in."""

    def __init__(
        self,
        fetch: FetchBatch,
        *,
        batch_size: int,
        poll_interval: float,
        max_poll_interval: float,
        not_found_grace: float,
        lazy_poll_interval: float,
        retry: RetryPolicy,
    ) -> None:
        self._fetch = fetch
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._not_found_grace = not_found_grace
        self._lazy_poll_interval = lazy_poll_interval
        self._retry = retry
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, _Entry]] = []
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._sleeping_until = float("inf")
        self._paused_until = 0.0
        self._failure_delays: Generator[float, Any, None] | None = None
        self._closed = False
        self._recent: OrderedDict[str, Task] = OrderedDict()
        self._announced: OrderedDict[str, None] = OrderedDict()  # see expedite()
        # Every task follows the same backoff schedule: computed once from backoff's
        # generator, each entry keeps only its index into it.
        self._delays = _schedule_of(
            backoff.expo(base=_GROWTH, factor=poll_interval, max_value=max_poll_interval),
            max_poll_interval,
        )

    # --- waiters --------------------------------------------------------------------

    async def wait(
        self, target: Target, *, timeout: float | None, on_update: OnUpdate | None = None
    ) -> Task:
        """The finished record of the target task; raises TaskTimeoutError at the deadline."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        entry = self._acquire(target)
        seen = 0
        try:
            while True:
                if on_update is not None and entry.version > seen and entry.last is not None:
                    seen = entry.version
                    try:
                        await call_on_update(on_update, entry.last, deadline)
                    except TimeoutError:  # on_update outlived the deadline
                        raise TaskTimeoutError(entry.task_id, entry.last, timeout=timeout) from None
                    continue  # the record may have changed again meanwhile
                if entry.outcome is not None:
                    return _result(entry)
                if deadline is not None and loop.time() >= deadline:
                    raise TaskTimeoutError(entry.task_id, entry.last, timeout=timeout)
                change = entry.next_change(loop)
                alarm = None if deadline is None else loop.call_at(deadline, _expire, change)
                try:
                    await change
                finally:
                    if alarm is not None:
                        alarm.cancel()
                    if change.cancelled():
                        entry.drop(change)
        finally:
            await self._release(entry)

    async def as_completed(
        self, targets: Iterable[Target], *, timeout: float | None
    ) -> AsyncGenerator[Task, None]:
        """Yield each task's finished record once, in the order they finish."""
        entries: dict[str, _Entry] = {}
        for target in targets:
            if target.task_id not in entries:
                entries[target.task_id] = self._acquire(target)
        finished: asyncio.Queue[_Entry] = asyncio.Queue()
        for entry in entries.values():
            if entry.outcome is not None:
                finished.put_nowait(entry)
            elif entry.on_settle is None:
                entry.on_settle = [finished.put_nowait]
            else:
                entry.on_settle.append(finished.put_nowait)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while entries:
                try:
                    async with asyncio.timeout_at(deadline):
                        entry = await finished.get()
                except TimeoutError:
                    pending = next(iter(entries.values()))
                    raise TaskTimeoutError(pending.task_id, pending.last, timeout=timeout) from None
                del entries[entry.task_id]
                await self._release(entry)
                yield _result(entry)
        finally:
            for entry in entries.values():
                if entry.on_settle is not None and finished.put_nowait in entry.on_settle:
                    entry.on_settle.remove(finished.put_nowait)
                await self._release(entry)

    def feed(self, task: Task, *, remember: bool = False) -> bool:
        """Offer a record seen elsewhere (a callback); True if it finished a watched task.

        With ``remember``, a finished record nobody waits on yet is kept (a bounded
        number of them) for a wait that starts a moment later.
        """
        entry = self._entries.get(task.id)
        if entry is None:
            if remember and task.done:
                _remember(self._recent, task.id, task)
            return False
        if not task.done:
            entry.update(task)
            return False
        self._finish(entry, task)
        return True

    def expedite(self, task_id: str) -> None:
        """A callback announced ``task_id`` but did not settle it: poll it eagerly.

        For a watched task (its record lagged the callback) from now on; for one nobody
        waits on yet, from when a wait starts. A bounded number are remembered.
        """
        entry = self._entries.get(task_id)
        if entry is None:
            _remember(self._announced, task_id, None)
            return
        entry.lazy = False
        entry.attempt = 0
        self._schedule(entry, asyncio.get_running_loop().time())

    def watching(self, task_id: str) -> bool:
        """Whether some waiter is waiting on ``task_id``."""
        return task_id in self._entries

    async def aclose(self) -> None:
        """Fail the remaining waiters and stop the loop; the poller is unusable after."""
        self._closed = True
        for entry in list(self._entries.values()):
            self._fail(entry, ClientClosedError("the client was closed during the wait"))
        await self._stop()

    # --- bookkeeping ----------------------------------------------------------------

    def _acquire(self, target: Target) -> _Entry:
        if self._closed:
            raise ClientClosedError("the client is closed")
        loop = asyncio.get_running_loop()
        task_id, lazy, known = target
        entry = self._entries.get(task_id)
        if entry is None:
            if task_id in self._announced:
                del self._announced[task_id]
                lazy = False
            entry = _Entry(task_id, lazy)
            # A finished record already in hand (the caller's, or a callback's): no polling.
            finished = known if known is not None and known.done else None
            finished = self._recent.pop(task_id, None) or finished
            if finished is not None:
                entry.refs += 1
                entry.update(finished)
                entry.settle(finished)
                return entry
            self._entries[task_id] = entry
            self._schedule(entry, loop.time())
        else:
            entry.lazy = entry.lazy and lazy  # one eager waiter is enough to poll eagerly
        entry.refs += 1
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._sleeping_until = float("inf")
            self._task = loop.create_task(self._run(), name="nanobanana-async poller")
        return entry

    async def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0 and self._entries.get(entry.task_id) is entry:
            self._forget(entry)
        if not self._entries:
            await self._stop()

    async def _stop(self) -> None:
        self._heap.clear()  # only stale items can be left: let their entries go
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait([task])

    def _forget(self, entry: _Entry) -> None:
        del self._entries[entry.task_id]
        entry.scheduled = False  # its heap item, if any, is skipped when popped
        # Rebuild the heap once stale items outnumber live ones, so forgotten entries
        # (timed out, cancelled, finished by a callback) do not pile up in it.
        if len(self._heap) > 2 * len(self._entries) + 64:
            self._heap = [item for item in self._heap if _live(item)]
            heapq.heapify(self._heap)

    def _finish(self, entry: _Entry, task: Task) -> None:
        if self._entries.get(entry.task_id) is entry:
            self._forget(entry)
        entry.update(task)
        entry.settle(task)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if self._entries.get(entry.task_id) is entry:
            self._forget(entry)
        entry.settle(error)

    def _schedule(self, entry: _Entry, now: float, delay: float | None = None) -> None:
        if delay is None:
            if entry.lazy:
                delay = self._lazy_poll_interval
            else:
                delays = self._delays
                delay = delays[min(entry.attempt, len(delays) - 1)]
                delay *= random.uniform(1 - _JITTER, 1 + _JITTER)
                delay = min(max(delay, self._poll_interval), self._max_poll_interval)
            entry.attempt += 1
        entry.due = now + delay
        entry.scheduled = True
        heapq.heappush(self._heap, (entry.due, next(self._seq), entry))
        if entry.due < self._sleeping_until and self._wakeup is not None:
            self._wakeup.set()

    def _peek(self) -> _Entry | None:
        heap = self._heap
        while heap:
            if _live(heap[0]):
                return heap[0][2]
            heapq.heappop(heap)  # stale: forgotten or rescheduled since
        return None

    def _take_round(self, now: float) -> list[list[_Entry]]:
        """Pop the due entries, topped up with the next due, cut into batches."""
        taken: list[_Entry] = []
        while (entry := self._peek()) is not None and entry.due <= now:
            heapq.heappop(self._heap)
            entry.scheduled = False
            taken.append(entry)
        room = -len(taken) % self._batch_size
        while room and (entry := self._peek()) is not None:
            heapq.heappop(self._heap)
            entry.scheduled = False
            taken.append(entry)
            room -= 1
        size = self._batch_size
        return [taken[i : i + size] for i in range(0, len(taken), size)]

    # --- the loop -------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._rounds()
        except Exception as exc:  # a bug must fail the waiters, not leave them hanging
            logger.exception("the poll loop crashed")
            for entry in list(self._entries.values()):
                self._fail(entry, exc)

    async def _rounds(self) -> None:
        loop = asyncio.get_running_loop()
        limit = asyncio.Semaphore(_CONCURRENT_REQUESTS)
        while self._entries:
            now = loop.time()
            entry = self._peek()
            wake_at = max(entry.due if entry is not None else float("inf"), self._paused_until)
            if wake_at > now:
                await self._sleep_until(wake_at)
                continue
            batches = self._take_round(now)
            await asyncio.gather(*(self._poll(batch, limit) for batch in batches))

    async def _sleep_until(self, when: float) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        self._sleeping_until = when
        handle = None
        if when != float("inf"):
            handle = asyncio.get_running_loop().call_at(when, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            self._sleeping_until = float("inf")
            if handle is not None:
                handle.cancel()

    async def _poll(self, batch: list[_Entry], limit: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        async with limit:
            batch = [entry for entry in batch if self._entries.get(entry.task_id) is entry]
            if not batch:
                return
            try:
                tasks, errors = await self._fetch([entry.task_id for entry in batch])
            except _FATAL as exc:
                logger.error("polling stopped: %s", exc)
                for entry in list(self._entries.values()):
                    self._fail(entry, exc)
                return
            except NanoBananaError as exc:
                self._round_failed(batch, exc, loop.time())
                return
        self._failure_delays = None
        now = loop.time()
        for entry in batch:
            if self._entries.get(entry.task_id) is not entry:
                continue  # its waiters left, or a callback finished it, during the request
            task = tasks.get(entry.task_id)
            if task is not None:
                entry.missing_since = None
                if task.done:
                    self._finish(entry, task)
                else:
                    entry.update(task)
                    self._schedule(entry, now)
            elif entry.task_id in errors:
                self._fail(entry, errors[entry.task_id])
            else:
                # The service may not list a just-submitted id yet: give it some grace.
                if entry.missing_since is None:
                    entry.missing_since = now
                if now - entry.missing_since >= self._not_found_grace:
                    self._fail(entry, TaskNotFoundError(entry.task_id))
                else:
                    self._schedule(entry, now)

    def _round_failed(self, batch: list[_Entry], exc: NanoBananaError, now: float) -> None:
        """Put a failed request's entries back, later; a 429 pauses the whole loop."""
        if self._failure_delays is None:
            self._failure_delays = backoff.expo(
                factor=self._poll_interval,
                max_value=max(self._max_poll_interval, _MAX_FAILURE_WAIT),
            )
            next(self._failure_delays)
        delay = max(self._poll_interval, backoff.full_jitter(next(self._failure_delays)))
        if isinstance(exc, RateLimitError):
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, self._retry.max_retry_after))
            self._paused_until = max(self._paused_until, now + delay)
        logger.warning("poll request failed, retrying in %.1f s: %s", delay, exc)
        for entry in batch:
            if self._entries.get(entry.task_id) is entry:
                self._schedule(entry, now, delay)


def _remember(memory: OrderedDict[str, T], key: str, value: T) -> None:
    """Keep ``key`` as the newest of a bounded memory, dropping the oldest past the limit."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _RECENT_LIMIT:
        memory.popitem(last=False)


def _live(item: tuple[float, int, _Entry]) -> bool:
    """Whether a heap item still stands for its entry's schedule."""
    due, _, entry = item
    return entry.scheduled and entry.due == due


def _schedule_of(waits: Generator[float, Any, None], cap: float) -> list[float]:
    """The waits a backoff generator yields, up to the first that reaches ``cap``."""
    next(waits)  # backoff's generators start with a bare yield
    schedule: list[float] = []
    for wait in waits:
        schedule.append(min(wait, cap))
        if wait >= cap or len(schedule) >= 64:
            return schedule
    return schedule


async def call_on_update(
    on_update: OnUpdate, task: Task, deadline: float | None = None
) -> None:
    """Call ``on_update`` with ``task``, awaiting it (within the deadline) if async."""
    result = on_update(task)
    if inspect.isawaitable(result):
        async with asyncio.timeout_at(deadline):
            await result
