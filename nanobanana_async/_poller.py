"""The poll loop: every wait on one client shares it, and it reads many tasks per request.

Each watched task id has one entry, shared by all its waiters. When to poll it depends
on its age (from the record's ``created_at`` when known, else from when its wait
began), never on how often it was polled: a task just submitted is first read at
``2.5 x poll_interval``, then every ``clamp(0.75 x age, poll_interval, max_poll_interval)``.
Ids whose age is unknown (a bare id) are read at once, to learn it. Durations seen on
finished records teach the loop how long tasks take, so it skips polls no young task
could answer.

When the soonest entry is due, a round goes out: the entries due within a short window
(``poll_interval / 4``), oldest-due first, in ``retrieve_batch`` requests of
``batch_size`` ids, the last one topped up with the eager entries due next (a request
costs the same for 1 id or 50). Tasks submitted together thus share requests. At most
``max_requests_per_second`` requests go out in any window of 1.05 s (a second and a
margin for the network's jitter), in bursts of a quarter of it, however many tasks are
watched; what does not fit waits, oldest-due first.

The loop owns its retries: each request is one attempt (``FetchBatch``) run as a task
of its own, so a slow or hung request holds only its own ids, never the next round. A
failed request puts only its ids back, after the loop's own backoff; a 429 pauses the
whole loop for the longer of its ``Retry-After`` and that backoff. An answer that
refuses the account by the service's own error code (``_retry.is_account_error``) fails
every waiter at once; a 401/403/404 with no code (a proxy's page) does so only after
three in a row. A 400/413 or an unreadable answer is split in halves until the one id
the service refuses is found: only its waiter fails.

The loop runs as one asyncio task, started by the first waiter and ending when the
last one leaves. Due times live in heaps (eager and lazy entries apart), waiters'
deadlines in one more with a single timer, so a round costs work in proportion to the
entries it polls, not to all entries watched.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
import inspect
import itertools
import logging
import math
import random
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, NamedTuple, TypeVar

import attrs

from ._errors import (
    BadRequestError,
    ClientClosedError,
    NanoBananaError,
    RateLimitError,
    ResponseDecodeError,
    TaskNotFoundError,
    TaskTimeoutError,
)
from ._models import Task, TaskState
from ._protocol import read_item, unchanged
from ._retry import POLL_FATAL, RetryPolicy, is_account_error

__all__ = ["FetchBatch", "OnUpdate", "Poller", "Target", "call_on_update"]

logger = logging.getLogger("nanobanana_async")

#: One poll request, one attempt, no retries: the raw records by id for these task ids
#: (an id the service does not know is absent), or raises a NanoBananaError.
FetchBatch = Callable[[list[str]], Awaitable[dict[str, Any]]]
#: Called with a task's record each time it changes; may be a coroutine function.
OnUpdate = Callable[[Task], Any]


class Target(NamedTuple):
    """What a wait is on: a task id; whether a callback will announce it (poll it
    lazily); the record if the caller holds one; and whether it was just submitted
    (its age is about zero, so its first poll can wait for it to have a chance)."""

    task_id: str
    lazy: bool = False
    known: Task | None = None
    fresh: bool = False


_FIRST_POLL = 2.5  # x poll_interval: the age of a fresh task's first poll
_AGE_FACTOR = 0.75  # the interval grows with age: 0.75 x age, within the bounds
_WINDOW = 0.25  # x poll_interval: entries due this soon go out with the round
_LEARNED = 0.8  # x the shortest recent duration: no poll of a younger task
_LEARNED_CAP = 4.0  # x max_poll_interval: the most that learning may hold a first read back
_DURATIONS = 32  # recent successful durations kept to learn from
_MAX_FAILURE_WAIT = 30.0  # cap on the loop's own backoff after failed requests
_MAX_IN_FLIGHT = 32  # requests running at once
_GARBLED = 3  # unreadable answers in a row, for one id alone, that fail its waiters
_REFUSALS = 3  # code-less 401/403/404 answers in a row that fail every waiter
_HELD_HALVES = 32  # halves of failed requests waiting out their backoff, at most
_NOTED_FAILURES = 10  # other failed tasks named on as_completed's error, at most
_RECENT_LIMIT = 1024  # callbacks remembered for waits not started yet
_SLACK = 0.001  # seconds: due this soon is due now
_WINDOW_S = 1.05  # the budget's window: a second, and a margin for the network's jitter

T = TypeVar("T")
R = TypeVar("R")


class _Entry:
    """One watched task id, shared by all its waiters: schedule, last record, outcome.

    Kept small (10,000 waiters must cost under 2 KB each): waiters park on futures of
    their own in ``listeners``, woken at every record change and at the outcome.
    """

    __slots__ = (
        "aged",
        "born",
        "due",
        "garbled",
        "last",
        "lazy",
        "listeners",
        "missing_since",
        "on_settle",
        "outcome",
        "polling",
        "refs",
        "scheduled",
        "suspect",
        "task_id",
        "version",
        "watched",
    )

    def __init__(self, task_id: str, lazy: bool, born: float, aged: bool) -> None:
        self.task_id = task_id
        self.lazy = lazy
        self.born = born  # loop time the task was created (or its wait began)
        self.aged = aged  # whether ``born`` is the task's own: fresh, or from created_at
        self.refs = 0
        self.last: Task | None = None
        self.version = 0  # bumped at every change of ``last``
        self.outcome: Task | BaseException | None = None  # set once, when settled
        self.due = 0.0
        self.scheduled = False  # whether a live heap item stands for this entry
        self.polling = False  # whether a request for it is in flight
        self.watched = False  # whether the poller holds it (in ``_entries``)
        self.missing_since: float | None = None
        self.garbled = 0  # unreadable answers in a row to a request for it alone
        # It failed in a request of its own: it may be the id the service trips over
        # (a 5xx for it alone), so it is read alone until a read of it succeeds.
        self.suspect = False
        # One waiter's future alone (the common case, no list to pay for), or a list.
        self.listeners: asyncio.Future[None] | list[asyncio.Future[None]] | None = None
        self.on_settle: list[Callable[[_Entry], None]] | None = None

    # Heap items are (due, task id, entry or group): these are reached only when two
    # items tie on both, which makes them equals.
    def __lt__(self, other: object) -> bool:
        return False

    def __gt__(self, other: object) -> bool:
        return False

    def next_change(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future of the caller's own, resolved at the next change or the outcome."""
        future = loop.create_future()
        listeners = self.listeners
        if listeners is None:
            self.listeners = future
        elif isinstance(listeners, list):
            listeners.append(future)
        else:
            self.listeners = [listeners, future]
        return future

    def drop(self, future: asyncio.Future[None]) -> None:
        """Forget a listener that stopped listening (its waiter was cancelled)."""
        listeners = self.listeners
        if listeners is future:
            self.listeners = None
        elif isinstance(listeners, list) and future in listeners:
            listeners.remove(future)

    def update(self, task: Task) -> None:
        if task is not self.last and task != self.last:
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
        if listeners is None:
            return
        for future in listeners if isinstance(listeners, list) else (listeners,):
            if not future.done():
                future.set_result(None)


def _result(entry: _Entry) -> Task:
    """The settled outcome: the finished record, or a raise of a copy of its error."""
    assert entry.outcome is not None
    return _unwrap(entry.outcome)


def _unwrap(outcome: Task | BaseException) -> Task:
    """``outcome`` if it is a record, else raise a copy of it.

    Many waiters may share one error; each raises its own copy, or the one instance's
    traceback would grow with every task it is raised in.
    """
    if isinstance(outcome, Task):
        return outcome
    try:
        error = copy.copy(outcome)
    except Exception:
        error = outcome.with_traceback(None)
    raise error


class _Alarms:
    """Waiters' deadlines in one heap behind one timer, instead of a timer each.

    A waiter registers once with a one-item list (its slot) holding the future it
    parks on now; at the deadline that future is resolved, and the waiter finds its
    deadline passed. A waiter that leaves empties its slot.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, list[asyncio.Future[None] | None]]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._dead = 0

    def add(self, loop: asyncio.AbstractEventLoop, deadline: float) -> list[Any]:
        slot: list[asyncio.Future[None] | None] = [None]
        heapq.heappush(self._heap, (deadline, next(self._seq), slot))
        if deadline < self._timer_at:
            self._arm(loop, deadline)
        return slot

    def remove(self, slot: list[Any]) -> None:
        slot[0] = None
        self._dead += 1
        if self._dead > len(self._heap) // 2 + 64:
            self._heap = [item for item in self._heap if item[2][0] is not None]
            heapq.heapify(self._heap)
            self._dead = 0

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._ring, loop)

    def _ring(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer, self._timer_at = None, float("inf")
        now = loop.time()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, _, slot = heapq.heappop(heap)
            future = slot[0]
            if future is None:
                self._dead = max(self._dead - 1, 0)
            elif not future.done():
                future.set_result(None)
        if heap:
            self._arm(loop, heap[0][0])

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, float("inf")
        self._heap.clear()
        self._dead = 0


class _Budget:
    """At most ``rate`` requests in any one-second window, spread over it.

    Two rules: a sliding log of send times caps any window of ``_WINDOW_S`` (a second,
    plus a margin for the network's jitter, so the service too sees no more than
    ``rate`` in any second) at ``rate``; and sends are paced ``_WINDOW_S / rate`` apart,
    in bursts of at most ``rate / 4`` (a round that needs a few requests sends them at
    once), so a second's requests do not all leave, and arrive, in one lump.
    """

    def __init__(self, rate: int) -> None:
        self._rate = rate
        self._sent: deque[float] = deque()
        self._spacing = _WINDOW_S / rate
        self._burst = max(1, rate // 4)
        self._paced = -math.inf  # when the pacing would next let one go, with no burst

    def available(self, now: float) -> int:
        sent = self._sent
        while sent and now - sent[0] >= _WINDOW_S:
            sent.popleft()
        window = self._rate - len(sent)
        ahead = max(self._paced, now) - now  # how far the pacing runs ahead of now
        paced = self._burst - math.ceil(ahead / self._spacing - 1e-9)
        return max(0, min(window, paced))

    def next_free(self, now: float) -> float:
        """When a whole burst may go again (call when none is available now): waking
        for each request alone would cost a wake-up per request, four bursts a second
        cost four."""
        when = now
        if len(self._sent) >= self._rate:
            when = self._sent[-self._rate] + _WINDOW_S
        return max(when, self._paced)

    def spend(self, now: float) -> None:
        self._sent.append(now)
        self._paced = max(self._paced, now) + self._spacing


_Item = tuple[float, str, "_Entry | list[_Entry]"]


class _Schedule:
    """Entries by due time, soonest first: a heap whose items stand for one entry, or for
    a group of entries put back together at one due time (a whole request read at the
    capped interval: one heap item instead of fifty). An item whose entry was forgotten
    or rescheduled since is stale, and dropped when met."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[_Item] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, entry: _Entry, due: float) -> None:
        entry.due = due
        entry.scheduled = True
        heapq.heappush(self._heap, (due, entry.task_id, entry))

    def push_group(self, entries: list[_Entry], due: float) -> None:
        for entry in entries:
            entry.due = due
            entry.scheduled = True
        heapq.heappush(self._heap, (due, entries[0].task_id, entries))

    def soonest(self) -> float:
        """The due time of the soonest live entry (inf when there is none)."""
        heap = self._heap
        while heap:
            due, _, held = heap[0]
            if isinstance(held, list):
                if any(entry.scheduled and entry.due == due for entry in held):
                    return due
            elif held.scheduled and held.due == due:
                return due
            heapq.heappop(heap)
        return math.inf

    def take(self, limit: float, room: int, into: list[_Entry]) -> None:
        """Move live entries due by ``limit`` into ``into``, soonest first, until it holds
        ``room``; what is left of a group goes back as a group."""
        heap, pop = self._heap, heapq.heappop
        while heap and len(into) < room:
            due, _, held = heap[0]
            if due > limit:
                return
            pop(heap)
            if not isinstance(held, list):
                if held.scheduled and held.due == due:
                    held.scheduled = False
                    into.append(held)
                continue
            for index, entry in enumerate(held):
                if entry.scheduled and entry.due == due:
                    if len(into) == room:
                        heapq.heappush(heap, (due, entry.task_id, held[index:]))
                        return
                    entry.scheduled = False
                    into.append(entry)

    def compact(self) -> None:
        """Drop every stale item (entries forgotten since): a rebuild in one pass."""
        kept: list[_Item] = []
        for due, tie, held in self._heap:
            if isinstance(held, list):
                live = [entry for entry in held if entry.scheduled and entry.due == due]
                if live:
                    kept.append((due, live[0].task_id, live))
            elif held.scheduled and held.due == due:
                kept.append((due, tie, held))
        heapq.heapify(kept)
        self._heap = kept

    def clear(self) -> None:
        self._heap.clear()


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
        max_requests_per_second: int = 20,
    ) -> None:
        self._fetch = fetch
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._max_poll_interval = max_poll_interval
        self._not_found_grace = not_found_grace
        self._lazy_poll_interval = lazy_poll_interval
        self._retry = retry
        self._window = poll_interval * _WINDOW
        self._first_poll = poll_interval * _FIRST_POLL
        self._learned_cap = max_poll_interval * _LEARNED_CAP
        self._budget = _Budget(max_requests_per_second)
        self._entries: dict[str, _Entry] = {}
        # Eager and lazy entries apart: a request is topped up with eager ones only.
        self._eager = _Schedule()
        self._lazy = _Schedule()
        self._splits: deque[list[_Entry]] = deque()  # refused batches, in halves
        # Halves of failed requests, each held until its backoff ends (then a split).
        self._held: set[asyncio.TimerHandle] = set()
        self._alarms = _Alarms()
        self._task: asyncio.Task[None] | None = None
        self._requests: set[asyncio.Task[None]] = set()
        self._wakeup: asyncio.Event | None = None
        # When the sleeping loop wakes by itself; -inf while it is awake (it looks at
        # the heaps again before it sleeps, so nothing need wake it).
        self._sleeping_until = -math.inf
        self._paused_until = 0.0
        self._failures = _Streak()  # failed requests in a row: the loop's backoff exponent
        self._refusals = _Streak()  # code-less 401/403/404 in a row (see _refuses_everyone)
        self._durations: deque[float] = deque(maxlen=_DURATIONS)
        self._shortest: float | None = None
        self._closed = False
        self._recent: OrderedDict[str, Task] = OrderedDict()
        self._announced: OrderedDict[str, None] = OrderedDict()  # see expedite()
        # Ids that failed in requests of their own, remembered past their entries: a
        # wait started again on one must not bring it back into shared requests.
        self._suspects: OrderedDict[str, None] = OrderedDict()

    # --- waiters --------------------------------------------------------------------

    async def wait(
        self,
        target: Target,
        then: Callable[[Task], R],
        *,
        timeout: float | None,
        on_update: OnUpdate | None = None,
        check: Callable[[], object] | None = None,
    ) -> R:
        """``then`` of the target task's finished record; TaskTimeoutError at the deadline.

        ``then`` (the record itself, or its image URLs) runs in this same coroutine:
        one frame per waiter. ``check`` runs first, in the event loop (the client's
        closed and loop checks).
        """
        if check is not None:
            check()
        loop = asyncio.get_running_loop()
        entry = self._acquire(target, loop)
        deadline = None if timeout is None else loop.time() + timeout
        slot = None if deadline is None else self._alarms.add(loop, deadline)
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
                    return then(_result(entry))
                if deadline is not None and loop.time() >= deadline:
                    raise TaskTimeoutError(entry.task_id, entry.last, timeout=timeout)
                change = entry.next_change(loop)
                if slot is not None:
                    slot[0] = change
                try:
                    await change
                finally:
                    if change.cancelled():
                        entry.drop(change)
        finally:
            if slot is not None:
                self._alarms.remove(slot)
            self._release(entry)
            if not self._entries:
                await self._stop()

    async def as_completed(
        self, targets: Iterable[Target], *, timeout: float | None
    ) -> AsyncGenerator[Task, None]:
        """Yield each task's finished record once, in the order they finish.

        A task whose record cannot be had (an unknown id, a refused or unreadable one)
        does not end the others: its error is raised once every other task was yielded,
        with a note naming any other task that failed so.
        """
        loop = asyncio.get_running_loop()
        failed: list[tuple[str, BaseException]] = []
        entries: dict[str, _Entry] = {}
        for target in targets:
            if target.task_id not in entries:
                entries[target.task_id] = self._acquire(target, loop)
        finished: asyncio.Queue[_Entry] = asyncio.Queue()
        for entry in entries.values():
            if entry.outcome is not None:
                finished.put_nowait(entry)
            elif entry.on_settle is None:
                entry.on_settle = [finished.put_nowait]
            else:
                entry.on_settle.append(finished.put_nowait)
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while entries:
                try:
                    async with asyncio.timeout_at(deadline):
                        entry = await finished.get()
                except TimeoutError:
                    pending = next(iter(entries.values()))
                    error = TaskTimeoutError(pending.task_id, pending.last, timeout=timeout)
                    _note_failures(error, failed)
                    raise error from None
                del entries[entry.task_id]
                self._release(entry)
                if isinstance(entry.outcome, Task):
                    yield entry.outcome
                else:
                    assert entry.outcome is not None
                    failed.append((entry.task_id, entry.outcome))
            if failed:
                _, outcome = failed.pop(0)
                try:
                    _unwrap(outcome)
                except BaseException as error:
                    _note_failures(error, failed)
                    raise
        finally:
            for entry in entries.values():
                if entry.on_settle is not None and finished.put_nowait in entry.on_settle:
                    entry.on_settle.remove(finished.put_nowait)
                self._release(entry)
            if not self._entries:
                await self._stop()

    def feed(self, task: Task, *, remember: bool = False) -> bool:
        """Offer a record seen elsewhere (a callback); True if it finished a watched task.

        With ``remember``, a finished record nobody waits on yet is kept (a bounded
        number of them) for a wait that starts a moment later.
        """
        entry = self._entries.get(task.id)
        if entry is None:
            if remember and task.done:
                # Kept without ``request`` (the echo of the submission, maybe data: URLs
                # of megabytes): a bounded count of records must mean bounded memory.
                _remember(self._recent, task.id, attrs.evolve(task, request=None))
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
        if not entry.polling:
            self._push(entry, asyncio.get_running_loop().time())  # read it now

    def watching(self, task_id: str) -> bool:
        """Whether some waiter is waiting on ``task_id``."""
        return task_id in self._entries

    async def aclose(self) -> None:
        """Fail the remaining waiters and stop the loop; the poller is unusable after."""
        self._closed = True
        for entry in list(self._entries.values()):
            self._fail(entry, ClientClosedError("the client was closed during the wait"))
        await self._stop()
        self._alarms.close()

    # --- bookkeeping ----------------------------------------------------------------

    def _acquire(self, target: Target, loop: asyncio.AbstractEventLoop) -> _Entry:
        if self._closed:
            raise ClientClosedError("the client is closed")
        task_id, lazy, known, fresh = target
        now = loop.time()
        entry = self._entries.get(task_id)
        finished = known if known is not None and known.done else None
        if entry is None:
            if task_id in self._announced:
                del self._announced[task_id]
                lazy = False
            entry = _Entry(task_id, lazy, now, fresh)
            entry.suspect = task_id in self._suspects
            # A finished record already in hand (the caller's, or a callback's): no polling.
            finished = self._recent.pop(task_id, None) or finished
            if finished is not None:
                entry.refs += 1
                entry.update(finished)
                entry.settle(finished)
                return entry
            self._entries[task_id] = entry
            entry.watched = True
            if known is not None:
                self._age(entry, known, now)
                entry.update(known)
                self._schedule(entry, now)
            elif fresh or lazy:
                self._schedule(entry, now)
            else:
                self._push(entry, now)  # an id of unknown age: read it now, to learn its age
        else:
            if entry.lazy and not lazy:
                # One eager waiter is enough to poll eagerly: out of the lazy heap now,
                # not at the lazy read it was scheduled for.
                entry.lazy = False
                if not entry.polling:
                    self._schedule(entry, now)
            if finished is not None:
                self._finish(entry, finished)  # the record in hand settles everyone now
        entry.refs += 1
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._sleeping_until = -math.inf
            self._task = loop.create_task(self._run(), name="nanobanana-async poller")
        return entry

    def _release(self, entry: _Entry) -> None:
        entry.refs -= 1
        if entry.refs == 0 and entry.watched:
            self._forget(entry)

    async def _stop(self) -> None:
        """Nothing is watched: end the loop and the requests still in flight."""
        self._eager.clear()  # only stale items can be left: let their entries go
        self._lazy.clear()
        self._splits.clear()
        for handle in self._held:
            handle.cancel()
        self._held.clear()
        task, self._task = self._task, None
        running = [job for job in (*self._requests, task) if job is not None and not job.done()]
        for job in running:
            job.cancel()
        if running:
            await asyncio.wait(running)

    def _forget(self, entry: _Entry) -> None:
        del self._entries[entry.task_id]
        entry.watched = False
        entry.scheduled = False  # its heap item, if any, is skipped when popped
        # Rebuild the heaps once stale items outnumber live ones, so forgotten entries
        # (timed out, cancelled, finished by a callback) do not pile up in them.
        if len(self._eager) + len(self._lazy) > 2 * len(self._entries) + 64:
            self._eager.compact()
            self._lazy.compact()

    def _finish(self, entry: _Entry, task: Task) -> None:
        if entry.watched:
            self._forget(entry)
        if task.state is TaskState.SUCCEEDED:
            self._learn(task)
        entry.update(task)
        entry.settle(task)

    def _fail(self, entry: _Entry, error: BaseException) -> None:
        if entry.watched:
            self._forget(entry)
        entry.settle(error)

    @staticmethod
    def _live_entry(entry: _Entry) -> bool:
        return entry.watched

    # --- schedule -------------------------------------------------------------------

    def _age(self, entry: _Entry, task: Task, now: float) -> None:
        """Date the entry from its record's ``created_at`` (the service's clock)."""
        created = task.created_at
        if created is None or entry.aged:
            return
        age = time.time() - created
        if 0 <= age < 86400:  # a clock skewed into the future, or nonsense, is ignored
            entry.born = min(entry.born, now - age)
            entry.aged = True

    def _learn(self, task: Task) -> None:
        """Keep how long a task took, to skip polls no younger task could answer."""
        if task.created_at is None or task.finished_at is None:
            return
        took = task.finished_at - task.created_at
        if 0 < took < 3600:
            self._durations.append(took)
            self._shortest = min(self._durations)

    def _schedule(self, entry: _Entry, now: float, delay: float | None = None) -> None:
        """Put the entry back in its heap: after ``delay``, else by its age."""
        self._push(entry, now + delay if delay is not None else self._due(entry, now))

    def _due(self, entry: _Entry, now: float) -> float:
        """When to read the entry next, by its age (lazily if a callback will announce it).

        Runs for every entry of every poll: plain comparisons, no min/max calls.
        """
        if entry.lazy:
            return now + self._lazy_poll_interval
        interval = _AGE_FACTOR * (now - entry.born)
        if interval < self._poll_interval:
            interval = self._poll_interval
        elif interval > self._max_poll_interval:
            interval = self._max_poll_interval
        due = now + interval
        if entry.aged:
            # A fresh task's first read waits until it could be done; so does any read
            # of a task younger than the shortest duration seen lately.
            earliest = entry.born + self._first_poll
            if self._shortest is not None:
                # Capped: a client running slow and fast models alike must not learn
                # from the slow ones to read the fast ones late.
                learned = entry.born + min(_LEARNED * self._shortest, self._learned_cap)
                if learned > earliest:
                    earliest = learned
            if earliest > due:
                due = earliest
        return due

    def _push(self, entry: _Entry, due: float) -> None:
        (self._lazy if entry.lazy else self._eager).push(entry, due)
        if due < self._sleeping_until:  # only while the loop sleeps past it
            self._wake()

    def _wake(self) -> None:
        self._sleeping_until = -math.inf  # once is enough
        if self._wakeup is not None:
            self._wakeup.set()

    def _take_due(self, limit: float, room: int) -> list[_Entry]:
        """Up to ``room`` entries due by ``limit``, oldest-due first, off both heaps."""
        taken: list[_Entry] = []
        eager, lazy = self._eager, self._lazy
        while len(taken) < room:
            first, other = eager.soonest(), lazy.soonest()
            if first <= other:
                if first > limit:
                    break
                eager.take(min(limit, other), room, taken)  # all due before lazy's first
            else:
                if other > limit:
                    break
                lazy.take(min(limit, first), room, taken)
        return taken

    def _soonest(self) -> float:
        return min(self._eager.soonest(), self._lazy.soonest())

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
        while self._entries:
            # A timer may fire a hair before its time (the clock's resolution): what is
            # due within _SLACK counts as due, so the loop never spins waiting for it.
            now = loop.time() + _SLACK
            wake_at = self._next_round(now)
            if wake_at > now:
                await self._sleep_until(wake_at)
                continue
            self._send_round(now, loop)

    def _next_round(self, now: float) -> float:
        """When the next request may go out: ``now``, or a time to sleep until."""
        if self._paused_until > now:
            return self._paused_until
        soonest = now if self._splits else self._soonest()
        if soonest > now:
            return soonest
        if len(self._requests) >= _MAX_IN_FLIGHT:
            return float("inf")  # woken when a request ends
        if self._budget.available(now) <= 0:
            return self._budget.next_free(now)
        return now

    def _send_round(self, now: float, loop: asyncio.AbstractEventLoop) -> None:
        """Send what is due: refused batches' halves first, then the oldest-due entries."""
        budget = self._budget
        slots = min(budget.available(now), _MAX_IN_FLIGHT - len(self._requests))
        batches: list[list[_Entry]] = []
        while self._splits and len(batches) < slots:
            half = [entry for entry in self._splits.popleft() if self._live_entry(entry)]
            if half:
                batches.append(half)
        size = self._batch_size
        room = (slots - len(batches)) * size
        taken = self._take_due(now + self._window, room)
        if taken:
            # A request costs the same for 1 id or 50: fill the last with eager entries
            # due next (never lazy ones: a callback will announce those).
            spare = -len(taken) % size
            if spare:
                self._eager.take(math.inf, len(taken) + spare, taken)
            if self._suspects and any(entry.suspect for entry in taken):
                taken = self._apart(taken, batches, slots, now)
            batches.extend(taken[i : i + size] for i in range(0, len(taken), size))
        for batch in batches:
            ids = []
            for entry in batch:
                entry.polling = True
                ids.append(entry.task_id)
            budget.spend(now)
            request = loop.create_task(self._request(batch, ids, loop.time()))
            self._requests.add(request)
            request.add_done_callback(self._request_done)

    def _apart(
        self, taken: list[_Entry], batches: list[list[_Entry]], slots: int, now: float
    ) -> list[_Entry]:
        """Give each suspect a request of its own, within the round's slots (the others
        go back, due now); returns the rest of ``taken``."""
        rest = [entry for entry in taken if not entry.suspect]
        free = slots - len(batches) - math.ceil(len(rest) / self._batch_size)
        for entry in taken:
            if entry.suspect:
                if free > 0:
                    batches.append([entry])
                    free -= 1
                else:
                    self._push(entry, now)
        return rest

    def _request_done(self, request: asyncio.Task[None]) -> None:
        self._requests.discard(request)
        if self._sleeping_until == math.inf:  # asleep until a request ends (the cap)
            self._wake()

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
            self._sleeping_until = -math.inf
            if handle is not None:
                handle.cancel()

    # --- one request ----------------------------------------------------------------

    async def _request(self, batch: list[_Entry], ids: list[str], sent: float) -> None:
        """One attempt for one batch; whatever happens, only its entries are affected
        (unless the service refuses the account itself: then every waiter fails)."""
        try:
            records = await self._fetch(ids)
        except asyncio.CancelledError:
            raise
        except NanoBananaError as exc:
            if self._refuses_everyone(exc, sent):
                logger.error("polling stopped: %s", exc)
                for entry in list(self._entries.values()):
                    self._fail(entry, exc)
            elif isinstance(exc, BadRequestError | ResponseDecodeError):
                self._refused(batch, exc, sent)
            else:
                self._request_failed(batch, exc, sent)
            return
        except Exception as exc:  # a bug: fail this batch's waiters, not the loop
            logger.exception("a poll request failed unexpectedly")
            for entry in batch:
                entry.polling = False
                if self._live_entry(entry):
                    self._fail(entry, exc)
            return
        self._failures.count = self._refusals.count = 0
        now = asyncio.get_running_loop().time()
        get = records.get
        capped = now + self._max_poll_interval
        group: list[_Entry] = []  # put back together: one heap item for all of them
        for entry in batch:
            entry.polling = False
            if not entry.watched:
                continue  # its waiters left, or a callback finished it, meanwhile
            raw, last = get(entry.task_id), entry.last
            if raw is not None and last is not None and unchanged(raw, last):
                # The common case, kept lean: a pending record that did not move.
                if entry.missing_since is not None or entry.garbled:
                    entry.missing_since, entry.garbled = None, 0
                if entry.suspect:
                    self._trusted(entry)
                due: float | None = self._due(entry, now)
            else:
                try:
                    due = self._take(entry, raw, now)
                except Exception as exc:  # a bug on one record fails its task only
                    logger.exception("reading the record of task %r failed", entry.task_id)
                    self._fail(entry, exc)
                    continue
            if due is None or not entry.watched:
                continue  # settled (an on_update hook may even have ended the wait)
            if due == capped and not entry.lazy:
                group.append(entry)
            else:
                self._push(entry, due)
        if group:
            self._eager.push_group(group, capped)
            if capped < self._sleeping_until:
                self._wake()

    def _trusted(self, entry: _Entry) -> None:
        """A request with a suspect in it was answered: it may share requests again."""
        entry.suspect = False
        self._suspects.pop(entry.task_id, None)

    def _take(self, entry: _Entry, raw: Any, now: float) -> float | None:
        """What one answer says of one entry: a change, the outcome, or nothing yet.

        Returns when to read the entry next (the caller puts it back), or None when it
        was settled.
        """
        if entry.suspect:
            self._trusted(entry)
        if raw is None:
            # The service may not list a just-submitted id yet: give it some grace.
            if entry.missing_since is None:
                entry.missing_since = now
            if now - entry.missing_since >= self._not_found_grace:
                self._fail(entry, TaskNotFoundError(entry.task_id))
                return None
            return self._due(entry, now)
        entry.missing_since = None
        entry.garbled = 0
        last = entry.last
        try:
            task = read_item(raw, last, entry.task_id)
        except ResponseDecodeError as exc:
            self._fail(entry, exc)
            return None
        if task is not last:
            if task.done:
                self._finish(entry, task)
                return None
            if not entry.aged:
                self._age(entry, task, now)
            entry.update(task)
        return self._due(entry, now)

    def _refused(self, batch: list[_Entry], exc: NanoBananaError, sent: float) -> None:
        """A 400/413 or an unreadable answer: find the id the service refuses by halves.

        A 400/413 for one id alone fails its waiters at once. An unreadable answer may
        be a passing fault (a proxy's page), so one id alone is retried, with backoff,
        until its answers were unreadable ``_GARBLED`` times in a row.
        """
        live = [entry for entry in batch if self._live_entry(entry)]
        for entry in batch:
            entry.polling = False
        if len(live) == 1:
            entry = live[0]
            entry.garbled += 1
            if isinstance(exc, BadRequestError) or entry.garbled >= _GARBLED:
                self._fail(entry, exc)
            else:
                self._request_failed(live, exc, sent)
            return
        if not live:
            return
        logger.warning("a poll request was refused (%s); splitting it to find why", exc)
        middle = len(live) // 2
        self._splits.extend((live[:middle], live[middle:]))
        self._wake()

    def _refuses_everyone(self, exc: NanoBananaError, sent: float) -> bool:
        """Whether ``exc`` fails every waiter: the service refused the account (a bad
        token, no balance, a wrong base URL, a disabled API), by its own error code; or a
        401/403/404 with no code (a proxy's page, say) came back ``_REFUSALS`` times in a
        row, with no other answer between them, which no backoff is mending."""
        if is_account_error(exc):
            return True
        if isinstance(exc, POLL_FATAL):
            now = asyncio.get_running_loop().time()
            self._failures.add(sent, now)
            # Counted apart from the backoff's failures: two 5xx then one page are not
            # three refusals.
            return self._refusals.add(sent, now) >= _REFUSALS
        self._refusals.count = 0
        return False

    def _request_failed(self, batch: list[_Entry], exc: NanoBananaError, sent: float) -> None:
        """Put a failed request's entries back, after the loop's backoff; a 429 pauses
        the whole loop for the longer of its Retry-After and that backoff."""
        now = asyncio.get_running_loop().time()
        if not isinstance(exc, POLL_FATAL):  # (those were counted when judged)
            self._failures.add(sent, now)
        failures = max(self._failures.count, 1)
        delay = min(self._poll_interval * 2.0 ** min(failures - 1, 32), _MAX_FAILURE_WAIT)
        delay *= random.uniform(1.0, 1.25)  # the floor holds; spread only upwards
        if isinstance(exc, RateLimitError):
            delay = self._retry.lengthened(delay, exc)
            self._paused_until = max(self._paused_until, now + delay)
        logger.warning("poll request failed, retrying in %.1f s: %s", delay, exc)
        live = []
        for entry in batch:
            entry.polling = False
            if self._live_entry(entry):
                live.append(entry)
        if isinstance(exc, RateLimitError) or len(live) < 2 or len(self._held) >= _HELD_HALVES:
            # (A 429 is about the client, not its ids; an outage fails every request:
            # past _HELD_HALVES halves waiting, the rest go back whole.)
            for entry in live:
                if len(live) == 1 and not isinstance(exc, RateLimitError):
                    entry.suspect = True
                    _remember(self._suspects, entry.task_id, None)
                self._schedule(entry, now, delay)
            return
        # The request may hold an id the service trips over (a 5xx, a hang, a proxy page
        # for that id alone): its halves go back apart, each sent as it is once the
        # backoff ends, so the other ids are not held with it, and it ends up alone.
        middle = len(live) // 2
        for half in (live[:middle], live[middle:]):
            self._hold(half, now + delay)

    def _hold(self, half: list[_Entry], when: float) -> None:
        """Send ``half`` as one request of its own at ``when`` (a split, not topped up)."""
        loop = asyncio.get_running_loop()

        def release() -> None:
            self._held.discard(handle)
            # Still watched and not read or queued again meanwhile (a callback, say).
            ready = [e for e in half if self._live_entry(e) and not e.scheduled and not e.polling]
            if ready:
                self._splits.append(ready)
                self._wake()

        handle = loop.call_at(when, release)
        self._held.add(handle)


class _Streak:
    """Failures in a row, where requests sent together that fail together count once: a
    failure counts only if its request went out after the last counted one was known."""

    __slots__ = ("count", "last_at")

    def __init__(self) -> None:
        self.count = 0
        self.last_at = -math.inf

    def add(self, sent: float, now: float) -> int:
        """Count a failure of a request sent at ``sent``, known at ``now``; the count."""
        if sent > self.last_at:
            self.count += 1
            self.last_at = now
        return self.count


def _note_failures(error: BaseException, failed: list[tuple[str, BaseException]]) -> None:
    """Name, on ``error``, the other tasks whose records could not be had: the first
    ``_NOTED_FAILURES`` of them, then how many more (a refused token fails them all)."""
    for task_id, outcome in failed[:_NOTED_FAILURES]:
        error.add_note(f"task {task_id!r} failed too: {type(outcome).__name__}: {outcome}")
    if len(failed) > _NOTED_FAILURES:
        error.add_note(f"and {len(failed) - _NOTED_FAILURES} more tasks failed too")


def _remember(memory: OrderedDict[str, T], key: str, value: T) -> None:
    """Keep ``key`` as the newest of a bounded memory, dropping the oldest past the limit."""
    memory[key] = value
    memory.move_to_end(key)
    while len(memory) > _RECENT_LIMIT:
        memory.popitem(last=False)


async def call_on_update(on_update: OnUpdate, task: Task, deadline: float | None = None) -> None:
    """Call ``on_update`` with ``task``, awaiting it (within the deadline) if async."""
    result = on_update(task)
    if inspect.isawaitable(result):
        async with asyncio.timeout_at(deadline):
            await result
