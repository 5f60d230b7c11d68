"""The poll loop alone: a scripted fetch (no HTTP) on a controllable clock.

Every test here runs on an event loop of ``looptime``'s, whose clock is fake: sleeps and
timers take no real time, and the clock reads exactly what the schedule says, so poll
times are asserted to the millisecond. (The tests run their loop themselves, through
``on_fake_time``, rather than through looptime's pytest plugin, which is switched off in
``pyproject.toml``: on Python 3.11 it makes an event loop around sync tests and leaves
it unclosed.) The loopback tests (``test_waiting.py``) cover the whole path over HTTP.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import suppress
from typing import Any

import looptime
import pytest

from nanobanana_async import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    NotFoundError,
    RateLimitError,
    ResponseDecodeError,
    RetryPolicy,
    ServerError,
    Task,
    TaskFailedError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from nanobanana_async._poller import Poller, Target


def on_fake_time(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on a fresh event loop whose fake clock starts at 0."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        loop = looptime.new_event_loop(start=0.0)  # the fake clock is on from the start
        try:
            loop.run_until_complete(asyncio.wait_for(test(*args, **kwargs), timeout=3600))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    return run


def now() -> float:
    return asyncio.get_running_loop().time()


class Service:
    """Tasks that finish at given loop times, read by a scripted fetch that logs calls."""

    def __init__(self) -> None:
        self.finish: dict[str, float] = {}
        self.calls: list[tuple[float, list[str]]] = []
        self.fault: Callable[[list[str]], Awaitable[None]] | None = None
        self.created: dict[str, float] = {}  # wall-clock created_at, when a test sets one
        self.took: dict[str, float] = {}  # service-side duration, for learning

    def add(self, task_id: str, finish: float = float("inf")) -> str:
        self.finish[task_id] = finish
        return task_id

    async def fetch(self, ids: list[str]) -> dict[str, Any]:
        self.calls.append((now(), list(ids)))
        if self.fault is not None:
            await self.fault(ids)
        records = {}
        for task_id in ids:
            if task_id in self.finish:
                records[task_id] = self.record(task_id)
        return records

    def record(self, task_id: str) -> dict[str, Any]:
        record: dict[str, Any] = {"id": task_id}
        if task_id in self.created:
            record["created_at"] = self.created[task_id]
        if now() < self.finish[task_id]:
            record["response"] = {"success": True, "task_id": task_id}
            return record
        if task_id in self.took:
            record["created_at"] = 1_000.0
            record["finished_at"] = 1_000.0 + self.took[task_id]
        else:
            record["finished_at"] = 1_000.0
        url = f"https://img.example/{task_id}.png"
        record["response"] = {"success": True, "task_id": task_id, "data": [{"image_url": url}]}
        return record

    def polls_of(self, task_id: str) -> list[float]:
        return [round(at, 3) for at, ids in self.calls if task_id in ids]


def make_poller(service: Service, **options: Any) -> Poller:
    settings: dict[str, Any] = {
        "batch_size": 50,
        "poll_interval": 1.0,
        "max_poll_interval": 1.5,
        "not_found_grace": 30.0,
        "lazy_poll_interval": 15.0,
        "retry": RetryPolicy(),
        "max_requests_per_second": 20,
        **options,
    }
    return Poller(service.fetch, **settings)


def itself(task: Task) -> Task:
    return task


async def wait(poller: Poller, target: Target | str, timeout: float | None = 600.0) -> Task:
    if isinstance(target, str):
        target = Target(target, fresh=True)
    return await poller.wait(target, itself, timeout=timeout)


@pytest.fixture
def service() -> Service:
    return Service()


# --- the schedule ------------------------------------------------------------------------


@on_fake_time
async def test_a_fresh_task_is_read_by_its_age(service: Service) -> None:
    poller = make_poller(service)
    service.add("a", finish=7.0)
    task = await wait(poller, "a")
    assert task.state is TaskState.SUCCEEDED
    # First read at 2.5 x poll_interval, then every clamp(0.75 x age, 1, 1.5).
    assert service.polls_of("a") == [2.5, 4.0, 5.5, 7.0]
    assert now() == 7.0


@on_fake_time
async def test_the_interval_grows_with_age_up_to_its_cap(service: Service) -> None:
    poller = make_poller(service, max_poll_interval=4.0)
    service.add("a", finish=12.0)
    await wait(poller, "a")
    # 2.5, then 0.75 x age: 1.875 at 2.5, 3.28 at 4.375, then the 4 s cap.
    assert service.polls_of("a") == [2.5, 4.375, 7.656, 11.656, 15.656]


@on_fake_time
async def test_a_bare_id_is_read_at_once_then_by_its_age(service: Service) -> None:
    poller = make_poller(service)
    service.add("a", finish=4.0)
    await wait(poller, Target("a"))
    # Age unknown: read now; the record has no created_at, so age counts from the wait.
    assert service.polls_of("a") == [0.0, 1.0, 2.0, 3.5, 5.0]


@on_fake_time
async def test_the_record_created_at_dates_an_old_task(service: Service) -> None:
    poller = make_poller(service)
    service.add("a", finish=3.0)
    service.created["a"] = time.time() - 120  # submitted two minutes ago
    await wait(poller, Target("a"))
    assert service.polls_of("a") == [0.0, 1.5, 3.0]


@on_fake_time
async def test_tasks_due_together_share_requests(service: Service) -> None:
    poller = make_poller(service)
    ids = [service.add(f"t{i}", finish=3.0) for i in range(120)]
    waits = []
    for index, task_id in enumerate(ids):
        waits.append(asyncio.create_task(wait(poller, task_id)))
        if index % 40 == 39:
            await asyncio.sleep(0.1)  # submitted over 0.2 s
    await asyncio.gather(*waits)
    sizes = [len(batch) for _, batch in service.calls]
    assert sizes == [50, 50, 20, 50, 50, 20]
    # Read together at 2.5 (the last ones a little young), then together again.
    assert sorted({round(at, 3) for at, _ in service.calls}) == [2.5, 4.0]


@on_fake_time
async def test_a_request_is_topped_up_with_the_eager_tasks_due_next(service: Service) -> None:
    poller = make_poller(service, batch_size=10)
    due_now = [service.add(f"now{i}") for i in range(3)]
    later = [service.add(f"later{i}") for i in range(5)]
    lazy = [service.add(f"lazy{i}") for i in range(5)]
    waits = [asyncio.create_task(wait(poller, Target(i))) for i in due_now]
    waits += [asyncio.create_task(wait(poller, i)) for i in later]
    waits += [asyncio.create_task(wait(poller, Target(i, lazy=True))) for i in lazy]
    await asyncio.sleep(0.01)
    at, first = service.calls[0]
    assert at == 0.0
    assert set(first) == set(due_now) | set(later)  # never a lazy one
    for waiter in waits:
        waiter.cancel()
    await asyncio.gather(*waits, return_exceptions=True)


@on_fake_time
async def test_learned_durations_skip_polls_no_young_task_could_answer(service: Service) -> None:
    poller = make_poller(service)
    service.add("teacher", finish=5.0)
    service.took["teacher"] = 5.0  # created_at/finished_at on the service's clock
    await wait(poller, "teacher")
    started = now()
    service.add("pupil", finish=started + 4.5)
    await wait(poller, "pupil")
    first = service.polls_of("pupil")[0]
    assert first == pytest.approx(started + 4.0)  # 0.8 x the shortest duration seen


@on_fake_time
async def test_slow_tasks_do_not_teach_a_long_first_wait(service: Service) -> None:
    # Found in review: 32 slow tasks made a fast task's first read 6.4 s late.
    poller = make_poller(service)
    service.add("slow", finish=60.0)
    service.took["slow"] = 60.0
    await wait(poller, "slow")
    started = now()
    service.add("fast", finish=started + 2.0)
    await wait(poller, "fast")
    # Learning holds a first read back by at most 4 x max_poll_interval (6 s).
    assert service.polls_of("fast")[0] == pytest.approx(started + 6.0)


# --- the request budget ----------------------------------------------------------------


@on_fake_time
async def test_the_budget_bounds_requests_in_any_second_and_polls_fairly(
    service: Service,
) -> None:
    poller = make_poller(service, max_requests_per_second=8)
    ids = [service.add(f"t{i}", finish=30.0) for i in range(1000)]
    waits = [asyncio.create_task(wait(poller, task_id)) for task_id in ids]
    await asyncio.gather(*waits)
    times = [at for at, _ in service.calls]
    for start in times:
        # At most the budget in any second (with a margin for the network's jitter) ...
        assert sum(1 for at in times if start <= at < start + 1.05) <= 8
        # ... and spread over it: bursts of a quarter of the budget at the most.
        assert sum(1 for at in times if start <= at < start + 0.25) <= 2
    # Oldest-due first: every id is read once before any is read twice.
    first_round = [task_id for _, batch in service.calls[:20] for task_id in batch]
    assert sorted(first_round) == sorted(ids)


# --- faults stay with their own tasks ------------------------------------------------------


@on_fake_time
async def test_a_refused_id_fails_only_its_own_waiter(service: Service) -> None:
    poller = make_poller(service, batch_size=16)
    ids = [service.add(f"t{i}", finish=5.0) for i in range(16)]
    service.add("bad", finish=5.0)
    ids[7] = "bad"

    async def refuse(batch: list[str]) -> None:
        if "bad" in batch:
            raise BadRequestError("ids are invalid.", status=400, code="bad_request")

    service.fault = refuse
    results = await asyncio.gather(*(wait(poller, i) for i in ids), return_exceptions=True)
    failed = [i for i, result in zip(ids, results, strict=True) if isinstance(result, Exception)]
    assert failed == ["bad"]
    assert isinstance(results[7], BadRequestError)
    # Bisected: 16 -> 8 -> 4 -> 2 -> 1, the good halves read at once.
    assert len(service.calls) <= 1 + 2 * 4 + 16


@on_fake_time
async def test_an_unreadable_answer_is_retried_before_it_fails_its_id(service: Service) -> None:
    poller = make_poller(service, batch_size=4)
    ids = [service.add(f"t{i}", finish=3.0) for i in range(4)]

    async def garble(batch: list[str]) -> None:
        if "t2" in batch:
            raise ResponseDecodeError("HTTP 200 answer is not JSON", status=200)

    service.fault = garble
    results = await asyncio.gather(*(wait(poller, i) for i in ids), return_exceptions=True)
    assert [type(result).__name__ for result in results] == [
        "Task",
        "Task",
        "ResponseDecodeError",
        "Task",
    ]
    assert len([at for at, batch in service.calls if batch == ["t2"]]) == 3


@on_fake_time
async def test_a_hung_request_holds_only_its_own_tasks(service: Service) -> None:
    poller = make_poller(service, batch_size=1)
    service.add("hung", finish=0.5)
    service.add("quick", finish=0.5)

    async def hang(batch: list[str]) -> None:
        if batch == ["hung"]:
            await asyncio.sleep(20)

    service.fault = hang
    hung = asyncio.create_task(wait(poller, Target("hung")))
    quick = await wait(poller, Target("quick"))
    assert quick.done
    assert now() <= 0.5 + 1.0 + 0.25  # its next read, not after the hung one
    assert not hung.done()
    await hung
    assert now() == pytest.approx(20.0)


@on_fake_time
async def test_a_429_with_retry_after_zero_pauses_by_the_loop_backoff(service: Service) -> None:
    poller = make_poller(service)
    service.add("a", finish=4.0)
    limited_until = 3.0

    async def limit(batch: list[str]) -> None:
        if now() < limited_until:
            raise RateLimitError("too many requests", retry_after=0.0)

    service.fault = limit
    await wait(poller, Target("a"))
    in_window = [at for at, _ in service.calls if at < limited_until]
    assert len(in_window) <= limited_until / 1.0 + 3
    gaps = [b - a for a, b in itertools.pairwise(in_window)]
    assert all(gap >= 1.0 for gap in gaps)  # never under the loop's backoff floor


@on_fake_time
async def test_a_5xx_puts_back_only_its_request_with_backoff(service: Service) -> None:
    poller = make_poller(service, batch_size=1)
    service.add("flaky", finish=1.0)
    service.add("fine", finish=1.0)
    fails = 2

    async def flaky(batch: list[str]) -> None:
        nonlocal fails
        if batch == ["flaky"] and fails:
            fails -= 1
            raise ServerError("fetch failed", status=500)

    service.fault = flaky
    fine, sick = await asyncio.gather(wait(poller, Target("fine")), wait(poller, Target("flaky")))
    assert fine.done
    assert sick.done
    assert service.polls_of("fine") == [0.0, 1.0]


async def refuse_the_token(batch: list[str]) -> None:
    """A fault: the service refuses the token (a 401 with its own code)."""
    raise AuthenticationError("token is invalid.", status=401, code="invalid_token")


@on_fake_time
async def test_a_fatal_error_fails_every_waiter_at_once(service: Service) -> None:
    poller = make_poller(service, batch_size=2)
    ids = [service.add(f"t{i}") for i in range(6)]
    service.fault = refuse_the_token
    results = await asyncio.gather(*(wait(poller, i) for i in ids), return_exceptions=True)
    assert all(isinstance(result, AuthenticationError) for result in results)
    assert now() == 2.5


@on_fake_time
async def test_a_proxy_page_once_fails_no_one_but_repeated_it_fails_everyone(
    service: Service,
) -> None:
    # Found in review: one HTML 404 (no error code) failed every waiter of the client.
    poller = make_poller(service, batch_size=1)
    ids = [service.add(f"t{i}", finish=2.0) for i in range(4)]
    pages = 1

    async def proxy(batch: list[str]) -> None:
        nonlocal pages
        if pages:
            pages -= 1
            raise NotFoundError("404 Not Found", status=404)  # a page: no code

    service.fault = proxy
    results = await asyncio.gather(*(wait(poller, Target(i)) for i in ids))
    assert all(task.done for task in results)

    async def always(batch: list[str]) -> None:
        raise NotFoundError("404 Not Found", status=404)

    service.fault = always
    ids = [service.add(f"u{i}", finish=60.0) for i in range(4)]
    failures = await asyncio.gather(*(wait(poller, Target(i)) for i in ids), return_exceptions=True)
    assert all(isinstance(failure, NotFoundError) for failure in failures)


@on_fake_time
async def test_an_id_the_service_trips_over_holds_back_no_other_task(service: Service) -> None:
    # Found in review: a request holding one id the service answers 500 for (or hangs
    # on) was retried whole, topped up again with the others, so none of them finished.
    poller = make_poller(service)
    ids = [service.add(f"t{i}", finish=1.0) for i in range(19)]
    service.add("bad", finish=1.0)

    async def trip(batch: list[str]) -> None:
        if "bad" in batch:
            raise ServerError("fetch failed", status=500)

    service.fault = trip
    bad = asyncio.create_task(wait(poller, Target("bad"), timeout=60.0))
    results = await asyncio.gather(*(wait(poller, Target(i)) for i in ids))
    assert all(task.done for task in results)
    assert now() < 10.0  # the healthy ones split off within a few backoffs
    with pytest.raises(TaskTimeoutError):
        await bad
    # Once alone, the bad id is read alone: the tasks that come later never share
    # its request.
    late = [service.add(f"late{i}", finish=now() + 1.0) for i in range(5)]
    bad = asyncio.create_task(wait(poller, Target("bad"), timeout=60.0))
    started = now()
    results = await asyncio.gather(*(wait(poller, Target(i)) for i in late))
    assert all(task.done for task in results)
    assert now() - started < 5.0
    bad.cancel()
    with suppress(asyncio.CancelledError):
        await bad


@on_fake_time
async def test_5xx_answers_do_not_count_toward_the_refusals(service: Service) -> None:
    # Found in review: two 502s then one proxy 404 page failed every waiter, as the
    # refusals were counted with the backoff's failures of any kind.
    poller = make_poller(service, batch_size=50)  # one request a round: failures in a row
    ids = [service.add(f"t{i}", finish=30.0) for i in range(4)]
    script = [ServerError("bad gateway", status=502)] * 2 + [
        NotFoundError("404 Not Found", status=404)
    ]

    async def flaky(batch: list[str]) -> None:
        if script:
            raise script.pop(0)

    service.fault = flaky
    results = await asyncio.gather(*(wait(poller, Target(i)) for i in ids))
    assert all(task.done for task in results)


@on_fake_time
async def test_as_completed_names_at_most_ten_other_failures(service: Service) -> None:
    poller = make_poller(service, batch_size=50)
    ids = [service.add(f"t{i}") for i in range(30)]
    service.fault = refuse_the_token
    with pytest.raises(AuthenticationError) as caught:
        async for _ in poller.as_completed([Target(i) for i in ids], timeout=None):
            pass
    notes = caught.value.__notes__
    assert len(notes) == 11
    assert notes[-1] == "and 19 more tasks failed too"


@on_fake_time
async def test_an_account_400_fails_everyone_without_bisecting(service: Service) -> None:
    # Found in review: a 400 token_mismatched was split id by id, 396 requests for 200.
    poller = make_poller(service, batch_size=50)
    ids = [service.add(f"t{i}") for i in range(200)]

    async def mismatched(batch: list[str]) -> None:
        raise BadRequestError("token mismatched", status=400, code="token_mismatched")

    service.fault = mismatched
    results = await asyncio.gather(*(wait(poller, i) for i in ids), return_exceptions=True)
    assert all(isinstance(result, BadRequestError) for result in results)
    assert len(service.calls) <= 4  # the first round's requests, no halves


@on_fake_time
async def test_requests_that_fail_together_count_as_one_failure(service: Service) -> None:
    # Found in review: one Retry-After: 1 on 4 requests sent together paused 9.6 s.
    poller = make_poller(service, batch_size=1)
    ids = [service.add(f"t{i}", finish=2.0) for i in range(4)]

    async def limit(batch: list[str]) -> None:
        if len(service.calls) <= 4:  # the first four, sent together
            raise RateLimitError("too many requests", retry_after=1.0)

    service.fault = limit
    await asyncio.gather(*(wait(poller, i) for i in ids))
    first, after = service.calls[0][0], service.calls[4][0]
    assert after - first <= 1.0 * 1.25 + 0.3  # one failure's pause, not four


@on_fake_time
async def test_an_eager_wait_on_a_lazily_watched_task_polls_it_now(service: Service) -> None:
    # Found in review: the eager waiter waited out the lazy (callback) interval, 15 s.
    poller = make_poller(service)
    service.add("a", finish=1.0)
    lazy = asyncio.create_task(wait(poller, Target("a", lazy=True)))
    await asyncio.sleep(0.5)
    task = await wait(poller, Target("a"))
    assert task.done
    assert now() < 3.0
    await lazy


@on_fake_time
async def test_as_completed_yields_the_others_before_raising_for_a_bad_id(
    service: Service,
) -> None:
    # Found in review: one unknown id ended as_completed for every other task.
    poller = make_poller(service, not_found_grace=1.0)
    good = [service.add(f"t{i}", finish=3.0) for i in range(5)]
    targets = [Target(task_id) for task_id in [*good, "typo-id"]]
    seen: list[str] = []

    async def collect() -> None:
        async for task in poller.as_completed(targets, timeout=60):
            seen.append(task.id)

    with pytest.raises(TaskNotFoundError):
        await collect()
    assert sorted(seen) == sorted(good)


def test_a_remembered_callback_record_is_kept_without_its_request() -> None:
    # Found in review: 1,024 remembered records with a 1 MB request held a gigabyte.
    poller = make_poller(Service())
    big = {"action": "edit", "image_urls": ["data:image/png;base64," + "A" * 1000]}
    record = Task(id="x", finished_at=1.0, request=big)
    assert not poller.feed(record, remember=True)
    assert poller._recent["x"].request is None
    assert poller._recent["x"].done


# --- waiters -----------------------------------------------------------------------------


@on_fake_time
async def test_a_finished_record_in_hand_settles_every_wait_on_it(service: Service) -> None:
    poller = make_poller(service, lazy_poll_interval=15.0)
    service.add("a")
    first = asyncio.create_task(wait(poller, Target("a", lazy=True)))
    await asyncio.sleep(1.0)
    finished = Task(id="a", finished_at=1.0)
    assert finished.done
    assert await wait(poller, Target("a", known=finished)) is finished
    assert await first is finished
    assert now() == 1.0
    assert service.calls == []


@on_fake_time
async def test_deadlines_share_one_timer_and_say_the_last_record(service: Service) -> None:
    poller = make_poller(service)
    service.add("slow")
    results = await asyncio.gather(
        *(wait(poller, "slow", timeout=t) for t in (3.0, 5.0, 7.0)), return_exceptions=True
    )
    assert all(isinstance(result, TaskTimeoutError) for result in results)
    assert all(isinstance(result, TaskTimeoutError) and result.last for result in results)
    assert now() == 7.0


@on_fake_time
async def test_failed_raises_through_then(service: Service) -> None:
    poller = make_poller(service)
    service.add("a", finish=2.0)

    def urls(task: Task) -> list[str]:
        if task.failure is not None:
            raise TaskFailedError(task)
        return task.image_urls

    assert await poller.wait(Target("a", fresh=True), urls, timeout=60) == [
        "https://img.example/a.png"
    ]


@on_fake_time
async def test_cancelled_waits_stop_the_loop_and_its_requests(service: Service) -> None:
    poller = make_poller(service)
    service.add("a")

    async def hang(batch: list[str]) -> None:
        await asyncio.sleep(100)

    service.fault = hang
    waiter = asyncio.create_task(wait(poller, Target("a")))
    await asyncio.sleep(1.0)
    assert poller._requests
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not poller._requests
    assert poller._task is None
    assert not poller.watching("a")


@on_fake_time
async def test_aclose_fails_the_waits_with_client_closed(service: Service) -> None:
    poller = make_poller(service)
    service.add("a")
    waiter = asyncio.create_task(wait(poller, "a"))
    await asyncio.sleep(0.5)
    await poller.aclose()
    with pytest.raises(ClientClosedError):
        await waiter
