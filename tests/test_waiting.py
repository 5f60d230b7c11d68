"""Waiting on tasks: await_completion, wait and as_completed on the shared batch poller."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import pytest

from nanobanana_async import (
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    NanoBananaClient,
    PermissionDeniedError,
    RetryPolicy,
    Submission,
    Task,
    TaskFailedError,
    TaskNotFoundError,
    TaskState,
    TaskTimeoutError,
)
from nanobanana_async.testing import FakeNanoBanana

MakeClient = Callable[..., NanoBananaClient]
POLLER_NAME = "nanobanana-async poller"


def poller_tasks() -> list[asyncio.Task[object]]:
    return [task for task in asyncio.all_tasks() if task.get_name() == POLLER_NAME]


async def test_await_completion_returns_image_urls(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    task_id = server.add_task(duration=0.1, count=2)
    urls = await client.await_completion(task_id, timeout=5)
    assert urls == server.tasks[task_id].image_urls
    assert len(urls) == 2


async def test_wait_accepts_a_submission(client: NanoBananaClient, server: FakeNanoBanana) -> None:
    submission = await client.generate("a cat")
    task = await client.wait(submission, timeout=5)
    assert task.state is TaskState.SUCCEEDED
    assert task.id == submission.task_id


async def test_a_finished_record_in_hand_makes_no_request(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    task = await client.retrieve(server.add_task())
    server.reset_counts()
    seen: list[Task] = []

    async def record(update: Task) -> None:
        await asyncio.sleep(0)
        seen.append(update)

    assert await client.wait(task, timeout=1, on_update=record) is task
    assert seen == [task]
    assert [found async for found in client.as_completed([task], timeout=1)] == [task]
    assert sum(server.counts.values()) == 0


@pytest.mark.parametrize(
    ("outcome", "code"),
    [("fail", "forbidden"), ("fail_top_level", None), ("fail_no_images", "no_images")],
)
async def test_failed_tasks(
    client: NanoBananaClient, server: FakeNanoBanana, outcome: str, code: str | None
) -> None:
    task_id = server.add_task(duration=0.05, outcome=outcome)
    task = await client.wait(task_id, timeout=5)  # wait returns failures, does not raise
    assert task.state is TaskState.FAILED
    with pytest.raises(TaskFailedError) as info:
        await client.await_completion(task_id, timeout=5)
    assert info.value.task.id == task_id
    assert info.value.message
    if code is not None:
        assert info.value.code == code


@pytest.mark.parametrize("shape", ["ack", "none"])
async def test_pending_records_are_not_mistaken_for_done(
    make_client: MakeClient, shape: str
) -> None:
    async with FakeNanoBanana(pending_shape=shape) as server:
        task_id = server.add_task(duration=0.4)
        seen: list[Task] = []
        async with make_client(base_url=server.base_url) as client:
            task = await client.wait(task_id, timeout=5, on_update=seen.append)
    assert task.state is TaskState.SUCCEEDED
    assert task.image_urls
    assert seen[0].state is TaskState.PENDING  # polled while pending, kept waiting
    assert seen[-1] == task


async def test_on_update_can_be_a_coroutine_function(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    states: list[TaskState] = []

    async def record(task: Task) -> None:
        await asyncio.sleep(0)
        states.append(task.state)

    await client.wait(server.add_task(duration=0.2), timeout=5, on_update=record)
    # Each call was awaited (the append comes after an await), the last one with the
    # finished record, and that one only once.
    assert states[-1] is TaskState.SUCCEEDED
    assert states.count(TaskState.SUCCEEDED) == 1


async def test_timeout_raises_with_the_last_record(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    task_id = server.add_task(duration=60)
    with pytest.raises(TaskTimeoutError) as info:
        await client.wait(task_id, timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert info.value.task_id == task_id
    assert info.value.last is not None
    assert info.value.last.state is TaskState.PENDING
    assert not poller_tasks()


async def test_duplicate_waiters_share_one_entry(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    task_id = server.add_task(duration=0.2)
    first, second = await asyncio.gather(
        client.wait(task_id, timeout=5), client.wait(task_id, timeout=5)
    )
    assert first is second
    assert set(server.batch_sizes) == {1}  # polled once per round, not once per waiter


async def test_cancelling_some_waiters_leaves_the_others(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    shared = server.add_task(duration=0.3)
    other = server.add_task(duration=0.3)
    doomed = [asyncio.create_task(client.wait(shared, timeout=5)) for _ in range(2)]
    doomed.append(asyncio.create_task(client.wait(server.add_task(duration=60), timeout=5)))
    survivors = [
        asyncio.create_task(client.wait(shared, timeout=5)),
        asyncio.create_task(client.wait(other, timeout=5)),
    ]
    await asyncio.sleep(0.05)
    for task in doomed:
        task.cancel()
    results = await asyncio.gather(*survivors)
    assert [task.id for task in results] == [shared, other]
    assert all(task.done for task in results)
    assert all(task.cancelled() for task in doomed)
    assert not poller_tasks()


async def test_cancelling_the_last_waiter_stops_the_loop(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    waiter = asyncio.create_task(client.wait(server.add_task(duration=60), timeout=5))
    await asyncio.sleep(0.1)
    assert poller_tasks()
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert not poller_tasks()


async def test_no_task_left_behind_after_the_last_waiter_returns(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.05 * i) for i in range(5)]
    await asyncio.gather(*(client.await_completion(task_id, timeout=5) for task_id in ids))
    assert not poller_tasks()
    # and it starts again for the next waiter
    assert await client.await_completion(server.add_task(), timeout=5)
    assert not poller_tasks()


async def test_many_waiters_cost_few_batched_requests(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.3) for _ in range(120)]
    results = await asyncio.gather(*(client.await_completion(i, timeout=10) for i in ids))
    assert results == [server.tasks[task_id].image_urls for task_id in ids]
    assert server.counts["retrieve"] == 0
    assert max(server.batch_sizes) <= 50
    # Each round reads every pending task in ceil(120 / 50) = 3 requests.
    assert server.counts["retrieve_batch"] <= 3 * 12


async def test_not_found_grace(make_client: MakeClient, server: FakeNanoBanana) -> None:
    async with make_client(not_found_grace=0.3) as client:
        with pytest.raises(TaskNotFoundError) as info:
            await client.wait("never-heard-of-it", timeout=5)
        assert info.value.task_id == "never-heard-of-it"

        async def appear_later() -> None:
            await asyncio.sleep(0.1)
            server.add_task(task_id="late-task", duration=0.05)

        appear = asyncio.create_task(appear_later())
        task = await client.wait("late-task", timeout=5)
        await appear
    assert task.state is TaskState.SUCCEEDED


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("error", {"status": 500}),
        ("html", {"status": 502}),
        ("rate_limit", {"retry_after": "0.1"}),
        ("drop", {}),
        ("not_json", {}),
    ],
)
async def test_poll_loop_rides_through_failures(
    make_client: MakeClient, server: FakeNanoBanana, kind: str, options: dict[str, object]
) -> None:
    ids = [server.add_task(duration=0.1) for _ in range(3)]
    server.inject(kind, times=4, action="retrieve_batch", **options)  # type: ignore[arg-type]
    async with make_client(retry=RetryPolicy.no_wait(max_retries=1)) as client:
        results = await asyncio.gather(*(client.await_completion(i, timeout=10) for i in ids))
    assert all(results)
    assert server.counts["retrieve_batch"] >= 5


@pytest.mark.parametrize(
    ("status", "error"), [(401, AuthenticationError), (403, PermissionDeniedError)]
)
async def test_fatal_errors_fail_every_waiter(
    client: NanoBananaClient, server: FakeNanoBanana, status: int, error: type[Exception]
) -> None:
    ids = [server.add_task(duration=60) for _ in range(3)]
    server.inject("error", status=status, action="retrieve_batch")
    results = await asyncio.gather(
        *(client.wait(i, timeout=5) for i in ids), return_exceptions=True
    )
    assert all(isinstance(result, error) for result in results)
    assert not poller_tasks()


async def test_a_400_on_the_batch_holding_one_bad_id_fails_that_waiter_only(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.2) for _ in range(12)]
    bad = ids[5]
    server.inject("error", status=400, action="retrieve_batch", task_id=bad, times=100)
    async with make_client() as client:
        results = await asyncio.gather(
            *(client.wait(i, timeout=10) for i in ids), return_exceptions=True
        )
    assert isinstance(results[5], BadRequestError)
    others = [result for index, result in enumerate(results) if index != 5]
    assert all(isinstance(r, Task) and r.state is TaskState.SUCCEEDED for r in others)


async def test_a_hung_batch_does_not_hold_the_others(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    hung = server.add_task(duration=0.0)
    quick = server.add_task(duration=0.3)
    server.inject("slow", delay=20, action="retrieve_batch", task_id=hung)
    async with make_client(batch_size=1, timeout=30) as client:
        loop = asyncio.get_running_loop()
        stuck = asyncio.create_task(client.wait(hung, timeout=60))
        await asyncio.sleep(0.05)  # the hung request is out
        started = loop.time()
        await client.wait(quick, timeout=10)
        assert loop.time() - started < 5  # not 20 s behind the hung request
        assert not stuck.done()
        stuck.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await stuck


async def test_retry_after_zero_on_every_poll_costs_a_bounded_number_of_requests(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    interval = 0.2
    task_id = server.add_task(duration=60)
    server.inject("rate_limit", retry_after="0", action="retrieve_batch", times=1000)
    async with make_client(poll_interval=interval, max_poll_interval=interval) as client:
        with pytest.raises(TaskTimeoutError):
            await client.wait(task_id, timeout=0.6)
    # In 3 poll intervals: at most 3 / poll_interval-worth of requests, plus 3.
    assert server.counts["retrieve_batch"] <= 3 + 3


def test_a_nan_timeout_is_refused(client: NanoBananaClient) -> None:
    for bad in (float("nan"), float("inf"), -1, True):
        with pytest.raises(ValueError, match="timeout"):
            client.wait("x", timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="timeout"):
            client.await_completion("x", timeout=bad)  # type: ignore[arg-type]


async def test_aclose_fails_waits_in_progress(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    client = make_client()
    waiter = asyncio.create_task(client.wait(server.add_task(duration=60), timeout=5))
    await asyncio.sleep(0.05)
    await client.aclose()
    with pytest.raises(ClientClosedError):
        await waiter
    assert not poller_tasks()


# --- as_completed -------------------------------------------------------------------------


async def test_as_completed_yields_in_finish_order(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    slow = server.add_task(duration=0.6)
    failed = server.add_task(duration=0.3, outcome="fail")
    fast = server.add_task(duration=0.05)
    seen = [task async for task in client.as_completed([slow, failed, fast, slow], timeout=5)]
    assert [task.id for task in seen] == [fast, failed, slow]
    assert seen[1].state is TaskState.FAILED
    assert not poller_tasks()


async def test_as_completed_timeout(client: NanoBananaClient, server: FakeNanoBanana) -> None:
    quick = server.add_task(duration=0.05)
    stuck = server.add_task(duration=60)
    seen: list[str] = []

    async def consume() -> None:
        async for task in client.as_completed([quick, stuck], timeout=0.5):
            seen.append(task.id)

    with pytest.raises(TaskTimeoutError) as info:
        await consume()
    assert seen == [quick]
    assert info.value.task_id == stuck
    assert not poller_tasks()


async def test_leaving_as_completed_early_ends_its_waits(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.05), server.add_task(duration=60)]
    iterator = client.as_completed(ids, timeout=5)
    async with contextlib.aclosing(iterator):
        async for _ in iterator:
            break
    assert not poller_tasks()


async def test_cancelling_as_completed_ends_its_waits(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=60) for _ in range(3)]

    async def consume() -> None:
        async for _ in client.as_completed(ids):
            pass

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(0.1)
    consumer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await consumer
    assert not poller_tasks()


# --- resources ------------------------------------------------------------------------------


async def test_cancelled_waits_leave_nothing_in_the_schedule(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    # Regression: forgotten entries stayed in the poller's heap after the last waiter
    # left, holding their records until the client's next wait.
    waiters = [
        asyncio.create_task(client.wait(server.add_task(duration=60), timeout=5))
        for _ in range(300)
    ]
    await asyncio.sleep(0.2)  # polled at least once: every entry holds a record
    for waiter in waiters:
        waiter.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
    assert not client._poller._entries
    assert not client._poller._eager
    assert not client._poller._lazy


async def test_timed_out_entries_do_not_pile_up_while_the_loop_runs(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    keeper = asyncio.create_task(client.wait(server.add_task(duration=60), timeout=5))
    for _ in range(3):
        ids = [server.add_task(duration=60) for _ in range(200)]
        await asyncio.gather(
            *(client.wait(task_id, timeout=0.05) for task_id in ids), return_exceptions=True
        )
    poller = client._poller
    assert len(poller._entries) == 1
    assert len(poller._eager) + len(poller._lazy) <= 2 * len(poller._entries) + 64
    keeper.cancel()
    await asyncio.gather(keeper, return_exceptions=True)


async def test_a_shared_error_is_raised_as_separate_instances(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    # One instance raised in many tasks would grow its traceback with each of them.
    task_id = server.add_task(duration=60)
    server.inject("error", status=401, action="retrieve_batch")
    first, second = await asyncio.gather(
        client.wait(task_id, timeout=5), client.wait(task_id, timeout=5), return_exceptions=True
    )
    assert isinstance(first, AuthenticationError)
    assert isinstance(second, AuthenticationError)
    assert first is not second
    assert first.code == second.code


# --- callbacks and lazy polling --------------------------------------------------------------


async def test_callback_before_the_wait_makes_the_wait_poll_eagerly(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    async with make_client(callback_poll_interval=60) as client:
        # Port 9 on loopback: nothing listens, the fake server's delivery just fails.
        submission = await client.generate("a cat", callback_url="http://127.0.0.1:9/cb")
        server.finish(submission.task_id)
        body = server.tasks[submission.task_id].result()
        assert await client.feed_callback(body) is None  # nobody waits yet: not resolved
        # Without the callback's hint this wait would poll lazily, after 60 s.
        task = await client.wait(submission, timeout=5)
    assert task.state is TaskState.SUCCEEDED


async def test_premature_callback_makes_a_lazy_wait_poll_eagerly(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    async with make_client(callback_poll_interval=60) as client:
        task_id = server.add_task(duration=60)  # still running on the service
        submission = Submission(task_id, callback_url="http://127.0.0.1:9/cb")
        waiter = asyncio.create_task(client.wait(submission, timeout=5))
        await asyncio.sleep(0.05)
        forged = {"success": True, "task_id": task_id, "data": [{"image_url": "https://x/y"}]}
        assert await client.feed_callback(forged) is None  # confirmed not done: ignored
        server.finish(task_id)
        task = await waiter
    assert task.image_urls == server.tasks[task_id].image_urls


async def test_a_429_pauses_the_whole_loop_for_retry_after(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.05) for _ in range(3)]
    server.inject("rate_limit", retry_after="0.4", action="retrieve_batch")
    # (RetryPolicy.no_wait() would ignore Retry-After, to keep other tests fast.)
    policy = RetryPolicy(max_retries=0, initial_wait=0, max_wait=0, jitter=False)
    async with make_client(retry=policy) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.gather(*(client.wait(task_id, timeout=5) for task_id in ids))
        waited = loop.time() - started
    # A lower bound only: no poll went out again before the service's hint ran out.
    assert waited >= 0.4
    assert server.counts["retrieve_batch"] == 2  # the refused round, then one that read all
