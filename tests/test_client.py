"""The client over real HTTP against the fake server: requests, errors, retries, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import aiohttp
import pytest

from nanobanana_async import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    ClientClosedError,
    NanoBananaClient,
    NanoBananaError,
    PermissionDeniedError,
    RateLimitError,
    ResponseDecodeError,
    RetryPolicy,
    ServerError,
    TaskNotFoundError,
    TaskState,
)
from nanobanana_async.testing import FakeNanoBanana

MakeClient = Callable[..., NanoBananaClient]


async def test_generate_sends_only_set_fields(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    submission = await client.generate("a cat")
    assert server.tasks[submission.task_id].request == {
        "action": "generate",
        "prompt": "a cat",
        "async": True,
    }
    assert submission.trace_id


async def test_edit_sends_images_and_no_aspect_ratio(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    submission = await client.edit(
        "make it blue", ["https://example.com/a.png"], model="nano-banana-pro", count=2
    )
    assert server.tasks[submission.task_id].request == {
        "action": "edit",
        "prompt": "make it blue",
        "image_urls": ["https://example.com/a.png"],
        "model": "nano-banana-pro",
        "count": 2,
        "async": True,
    }


async def test_bad_arguments_fail_before_any_request(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    with pytest.raises(ValueError, match="prompt"):
        await client.generate("  ")
    with pytest.raises(ValueError, match="image_urls"):
        await client.edit("blue", [])
    with pytest.raises(ValueError, match="count"):
        await client.generate("a cat", count=9)
    with pytest.raises(ValueError, match="task_id"):
        await client.retrieve("")
    with pytest.raises(ValueError, match="empty"):
        await client.retrieve_batch([])
    assert sum(server.counts.values()) == 0


async def test_retrieve_pending_then_finished(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    task_id = server.add_task(duration=60)
    assert (await client.retrieve(task_id)).state is TaskState.PENDING
    server.finish(task_id)
    task = await client.retrieve(task_id)
    assert task.state is TaskState.SUCCEEDED
    assert task.image_urls == server.tasks[task_id].image_urls


async def test_retrieve_unknown_id(client: NanoBananaClient) -> None:
    with pytest.raises(TaskNotFoundError, match="no-such-task"):
        await client.retrieve("no-such-task")


async def test_retrieve_batch_splits_and_merges(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task() for _ in range(7)]
    async with make_client(batch_size=3) as client:
        batch = await client.retrieve_batch([*ids, "unknown", ids[0]])
    assert sorted(task.id for task in batch.items) == sorted(ids)
    assert batch.count == 7
    assert server.counts["retrieve_batch"] == 3
    assert sorted(server.batch_sizes) == [2, 3, 3]


async def test_retrieve_batch_failure_leaves_no_request_running(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task() for _ in range(3)]
    server.inject("slow", delay=2.0, action="retrieve_batch")
    server.inject("error", status=401, action="retrieve_batch")
    async with make_client(batch_size=1) as client:
        with pytest.raises(AuthenticationError):
            await client.retrieve_batch(ids)
        running = [
            task for task in asyncio.all_tasks() if "_retrieve_chunk" in repr(task.get_coro())
        ]
        assert not running  # the slow chunk was cancelled, not left behind


# --- errors over HTTP ---------------------------------------------------------------------


async def test_wrong_token(make_client: MakeClient, server: FakeNanoBanana) -> None:
    async with NanoBananaClient("wrong-token", base_url=server.base_url) as client:
        with pytest.raises(AuthenticationError) as info:
            await client.generate("a cat")
    assert info.value.status == 401
    assert "wrong-token" not in str(info.value) + repr(info.value)


async def test_unknown_model_is_a_bad_request(client: NanoBananaClient) -> None:
    with pytest.raises(BadRequestError) as info:
        await client.generate("a cat", model="no-such-model")
    assert info.value.status == 400


async def test_used_up(client: NanoBananaClient, server: FakeNanoBanana) -> None:
    server.inject("error", code="used_up")
    with pytest.raises(PermissionDeniedError) as info:
        await client.generate("a cat")
    assert info.value.code == "used_up"
    assert info.value.trace_id


async def test_proxy_html_page(make_client: MakeClient, server: FakeNanoBanana) -> None:
    server.inject("html", status=502, times=5)
    async with make_client(retry=RetryPolicy.no_wait(max_retries=1)) as client:
        with pytest.raises(ServerError, match="502 Bad Gateway") as info:
            await client.retrieve("x")
    assert info.value.status == 502
    assert server.counts["retrieve"] == 2


async def test_non_json_success_body(client: NanoBananaClient, server: FakeNanoBanana) -> None:
    task_id = server.add_task()
    server.inject("not_json", action="retrieve")
    with pytest.raises(ResponseDecodeError) as info:
        await client.retrieve(task_id)
    assert info.value.status == 200
    assert info.value.body_excerpt.startswith("<html>")


# --- retries ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("error", {"status": 500}),
        ("html", {"status": 502}),
        ("html", {"status": 503}),
        ("html", {"status": 504}),
        ("rate_limit", {"retry_after": "0"}),
        ("drop", {}),
    ],
)
async def test_reads_retry_transient_failures(
    client: NanoBananaClient, server: FakeNanoBanana, kind: str, options: dict[str, object]
) -> None:
    task_id = server.add_task()
    server.inject(kind, times=2, action="retrieve", **options)  # type: ignore[arg-type]
    assert (await client.retrieve(task_id)).done
    assert server.counts["retrieve"] == 3


async def test_reads_give_up_after_max_retries(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    server.inject("error", status=500, times=10)
    async with make_client(retry=RetryPolicy.no_wait(max_retries=2)) as client:
        with pytest.raises(ServerError):
            await client.retrieve("x")
    assert server.counts["retrieve"] == 3


async def test_reads_honour_retry_after(make_client: MakeClient, server: FakeNanoBanana) -> None:
    task_id = server.add_task()
    server.inject("rate_limit", retry_after="0.2", action="retrieve")
    policy = RetryPolicy(initial_wait=0, max_wait=0, jitter=False)
    async with make_client(retry=policy) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.retrieve(task_id)
        waited = loop.time() - started
    # The only wait is the service's hint (a lower bound; no upper bound is asserted).
    assert waited >= 0.2


async def test_rate_limit_error_carries_retry_after(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    server.inject("rate_limit", retry_after="3", times=5)
    async with make_client(retry=RetryPolicy.no_wait(max_retries=0)) as client:
        with pytest.raises(RateLimitError) as info:
            await client.retrieve("x")
    assert info.value.retry_after == 3.0


@pytest.mark.parametrize(
    ("kind", "options", "error"),
    [
        ("error", {"status": 500}, ServerError),
        ("html", {"status": 502}, ServerError),
        ("drop", {}, APIConnectionError),
    ],
)
async def test_submissions_are_never_resent_once_they_may_have_arrived(
    client: NanoBananaClient,
    server: FakeNanoBanana,
    kind: str,
    options: dict[str, object],
    error: type[Exception],
) -> None:
    server.inject(kind, action="generate", **options)  # type: ignore[arg-type]
    with pytest.raises(error) as info:
        await client.generate("a cat")
    assert server.counts["generate"] == 1
    assert any("may have reached the service" in note for note in info.value.__notes__)


async def test_submission_timeout_is_not_retried(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    server.inject("slow", delay=1.0, action="generate")
    async with make_client(timeout=0.2) as client:
        with pytest.raises(APITimeoutError) as info:
            await client.generate("a cat")
    assert isinstance(info.value, TimeoutError)
    assert info.value.request_sent
    assert server.counts["generate"] == 1


async def test_submissions_retry_on_429(client: NanoBananaClient, server: FakeNanoBanana) -> None:
    server.inject("rate_limit", retry_after="0", action="generate", times=2)
    submission = await client.generate("a cat")
    assert submission.task_id in server.tasks
    assert server.counts["generate"] == 3


async def test_submissions_retry_when_the_connection_was_never_made() -> None:
    # Nothing listens on the port: the request cannot have reached anyone.
    async with FakeNanoBanana() as gone:
        base_url = gone.base_url
    attempts = 0

    def count(record: logging.LogRecord) -> bool:
        nonlocal attempts
        attempts += record.getMessage().startswith("retrying")
        return True

    logger = logging.getLogger("nanobanana_async")
    logger.addFilter(count)
    logger.setLevel(logging.DEBUG)
    try:
        async with NanoBananaClient(
            "t", base_url=base_url, retry=RetryPolicy.no_wait(max_retries=2)
        ) as client:
            with pytest.raises(APIConnectionError) as info:
                await client.generate("a cat")
    finally:
        logger.removeFilter(count)
        logger.setLevel(logging.NOTSET)
    assert not info.value.request_sent
    assert attempts == 2
    assert not getattr(info.value, "__notes__", None)


async def test_read_timeout(make_client: MakeClient, server: FakeNanoBanana) -> None:
    server.inject("slow", delay=1.0, times=5)
    async with make_client(timeout=0.1, retry=RetryPolicy.no_wait(max_retries=1)) as client:
        with pytest.raises(APITimeoutError):
            await client.retrieve("x")
    assert server.counts["retrieve"] == 2


# --- configuration, lifecycle and secrets ---------------------------------------------------


def test_token_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ACEDATACLOUD_API_TOKEN", "env-token")
    monkeypatch.setenv("ACEDATACLOUD_API_BASE_URL", "http://127.0.0.1:9/")
    client = NanoBananaClient()
    assert client.base_url == "http://127.0.0.1:9"
    assert "env-token" not in repr(client)


def test_missing_token_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACEDATACLOUD_API_TOKEN", raising=False)
    with pytest.raises(NanoBananaError, match="ACEDATACLOUD_API_TOKEN"):
        NanoBananaClient()


def test_default_base_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ACEDATACLOUD_API_BASE_URL", raising=False)
    assert NanoBananaClient("t").base_url == "https://api.acedata.cloud"


@pytest.mark.parametrize(
    ("options", "argument"),
    [
        ({"base_url": "ftp://x"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"timeout": 0}, "timeout"),
        ({"batch_size": 0}, "batch_size"),
        ({"poll_interval": 0}, "poll_interval"),
        ({"poll_interval": 10, "max_poll_interval": 5}, "poll_interval"),
        ({"timeout": float("nan")}, "timeout"),
        ({"timeout": float("inf")}, "timeout"),
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 2.0}, "batch_size"),
        ({"poll_interval": float("nan")}, "poll_interval"),
        ({"max_poll_interval": float("inf")}, "max_poll_interval"),
        ({"not_found_grace": float("nan")}, "not_found_grace"),
        ({"callback_poll_interval": -1}, "callback_poll_interval"),
        ({"max_retries": True}, "max_retries"),
        ({"max_retries": 3, "retry": RetryPolicy(max_retries=5)}, "max_retries"),
    ],
)
def test_bad_options(options: dict[str, object], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        NanoBananaClient("t", **options)  # type: ignore[arg-type]


async def test_token_never_logged_or_shown(
    server: FakeNanoBanana, caplog: pytest.LogCaptureFixture
) -> None:
    secret = server.token
    caplog.set_level(logging.DEBUG, logger="nanobanana_async")
    server.inject("error", status=500, action="retrieve")
    async with NanoBananaClient(
        secret, base_url=server.base_url, retry=RetryPolicy.no_wait()
    ) as client:
        assert secret not in repr(client)
        submission = await client.generate("a cat")
        await client.retrieve(submission.task_id)
        with pytest.raises(TaskNotFoundError) as info:
            await client.retrieve("nope")
    assert secret not in str(info.value) + repr(info.value)
    assert caplog.records, "debug logging should say something"
    for record in caplog.records:
        assert secret not in record.getMessage()
    messages = [record.getMessage() for record in caplog.records]
    assert any(submission.task_id in message for message in messages)
    assert any(
        "/nano-banana/tasks retrieve -> 200" in message
        and f"trace_id={server.tasks[submission.task_id].trace_id}" in message
        for message in messages
    )
    assert any("retrying after HTTP 500" in message for message in messages)


async def test_borrowed_session_is_not_closed(server: FakeNanoBanana) -> None:
    async with aiohttp.ClientSession() as session:
        async with NanoBananaClient(
            server.token, base_url=server.base_url, session=session
        ) as client:
            await client.generate("a cat")
        assert not session.closed


async def test_closed_client_refuses_work(client: NanoBananaClient) -> None:
    await client.aclose()
    await client.aclose()  # idempotent
    with pytest.raises(ClientClosedError):
        await client.generate("a cat")
    with pytest.raises(ClientClosedError):
        await client.wait("some-id", timeout=1)
    assert "closed" in repr(client)


def test_one_client_per_event_loop(server_url_and_token: tuple[str, str]) -> None:
    base_url, token = server_url_and_token
    client = NanoBananaClient(token, base_url=base_url, retry=RetryPolicy.no_wait(max_retries=0))

    async def use() -> None:
        with pytest.raises(APIConnectionError):
            await client.retrieve("x")  # nothing listens: fails fast, binds the loop

    async def reuse() -> None:
        with pytest.raises(NanoBananaError, match="another event loop"):
            await client.retrieve("x")

    async def close() -> None:
        await client.aclose()

    asyncio.run(use())
    asyncio.run(reuse())
    asyncio.run(close())


@pytest.fixture
def server_url_and_token() -> tuple[str, str]:
    # A port where nothing listens (the fake server was started and closed).
    async def closed_server() -> tuple[str, str]:
        async with FakeNanoBanana() as fake:
            return fake.base_url, fake.token

    return asyncio.run(closed_server())


async def test_aclose_stops_api_calls_in_flight_at_once(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    # Found in review: a retrieve in flight ran to the client's timeout after aclose,
    # then raised APITimeoutError.
    server.inject("slow", delay=30, times=2)
    client = make_client(timeout=20)
    reading = asyncio.create_task(client.retrieve("x"))
    submitting = asyncio.create_task(client.generate("a cat"))
    await wait_for_requests(server, 2)
    async with asyncio.timeout(5):
        await client.aclose()
        with pytest.raises(ClientClosedError):
            await reading
        with pytest.raises(ClientClosedError) as info:
            await submitting
    assert any("may have reached the service" in note for note in info.value.__notes__)
    assert info.value.request_sent
    with pytest.raises(ClientClosedError) as closed:
        await client.generate("a cat")
    assert not getattr(closed.value, "__notes__", None)  # closed before: nothing was sent
    assert not closed.value.request_sent


async def test_an_aclose_cancelled_midway_still_closes_the_session(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    # Found in review: a cancel during aclose (a TaskGroup, a second Ctrl-C) left the
    # owned session open for good, and a second aclose() returned at once.
    server.inject("slow", delay=30, times=5)
    client = make_client(timeout=20)
    waiting = asyncio.create_task(client.wait(server.add_task(duration=60), timeout=30))
    await wait_for_requests(server, 1)
    session = client._session
    assert session is not None
    closing = asyncio.create_task(client.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await closing
    async with asyncio.timeout(5):
        await client.aclose()
    assert session.closed
    with pytest.raises(ClientClosedError):
        await waiting


async def wait_for_requests(server: FakeNanoBanana, count: int) -> None:
    async with asyncio.timeout(5):
        while sum(server.counts.values()) < count:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
