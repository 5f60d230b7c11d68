"""The callback receiver, end to end: fake service -> real HTTP -> receiver -> client waiters."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from yarl import URL

from nanobanana_async import (
    ClientClosedError,
    NanoBananaClient,
    RetryPolicy,
    Submission,
    Task,
    TaskState,
)
from nanobanana_async.testing import FakeNanoBanana
from nanobanana_async.webhooks import DEFAULT_PATH, SECRET_PARAM, CallbackReceiver

WAIT = 10.0  # upper bound for every wait here; callbacks take milliseconds
EVIL = "https://evil.example/injected.png"


@attrs.define
class Rig:
    """A fake service, a client on it, and a receiver mounted on a real local server."""

    server: FakeNanoBanana
    client: NanoBananaClient
    receiver: CallbackReceiver
    endpoint: str  # where the receiver listens, without the secret
    url: str  # the callback URL to submit, with the secret
    http: aiohttp.ClientSession
    runner: web.AppRunner

    def submission(self, task_id: str) -> Submission:
        """What ``generate(callback_url=...)`` would have returned for ``task_id``."""
        return Submission(task_id=task_id, callback_url=self.url)

    def add_task(self, **kw: Any) -> str:
        return self.server.add_task(callback_url=self.url, **kw)

    async def post(self, body: bytes | dict[str, Any], *, secret: str | None = "right") -> int:
        """POST a callback body; ``secret="right"`` uses the receiver's own URL."""
        if secret == "right":
            url = self.url
        elif secret is None:
            url = self.endpoint
        else:
            url = str(URL(self.endpoint).update_query({SECRET_PARAM: secret}))
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with self.http.post(url, data=data) as response:
            await response.read()
            return response.status


RigFactory = Callable[..., Any]


@pytest.fixture
async def make_rig() -> AsyncIterator[RigFactory]:
    """Build rigs; everything is closed in reverse order when the test ends."""
    async with AsyncExitStack() as stack:

        async def build(
            *,
            duration: float = 0.2,
            verify: bool = True,
            callback_poll_interval: float = 60.0,
            **receiver_options: Any,
        ) -> Rig:
            server = await stack.enter_async_context(FakeNanoBanana(duration=duration))
            client = await stack.enter_async_context(
                NanoBananaClient(
                    server.token,
                    base_url=server.base_url,
                    poll_interval=0.02,
                    max_poll_interval=0.1,
                    callback_poll_interval=callback_poll_interval,
                    retry=RetryPolicy.no_wait(),
                )
            )
            receiver = CallbackReceiver(client, verify=verify, **receiver_options)
            app = web.Application()
            receiver.add_route(app)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}{DEFAULT_PATH}"
            http = await stack.enter_async_context(
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT))
            )
            url = receiver.callback_url(endpoint)
            return Rig(server, client, receiver, endpoint, url, http, runner)

        yield build


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds, failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls plain state, no event to await
            await asyncio.sleep(0.005)


async def drain(receiver: CallbackReceiver) -> None:
    async with asyncio.timeout(WAIT):
        await receiver.drain()


def forged(task_id: str) -> dict[str, Any]:
    return {"success": True, "task_id": task_id, "data": [{"image_url": EVIL}]}


def leftover_callback_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith("nanobanana-async callback")]


# --------------------------------------------------------------------------- URLs and secrets


async def test_callback_url_adds_secret_and_keeps_query(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    url = URL(rig.receiver.callback_url("https://svc.example/hooks/nb?tenant=7&a=b"))
    assert (url.scheme, url.host, url.path) == ("https", "svc.example", "/hooks/nb")
    assert url.query["tenant"] == "7"
    assert url.query["a"] == "b"
    secret = url.query[SECRET_PARAM]
    assert len(secret) >= 32
    # Asking again replaces the parameter rather than adding a second one.
    again = URL(rig.receiver.callback_url(str(url)))
    assert again.query.getall(SECRET_PARAM) == [secret]
    for bad in ("ftp://svc.example/x", "/relative/path", "not a url"):
        with pytest.raises(ValueError, match="public_url") as info:
            rig.receiver.callback_url(bad)
        assert secret not in str(info.value)
    assert secret not in repr(rig.receiver)
    assert secret not in str(rig.receiver)
    # Two receivers never share a generated secret.
    other = CallbackReceiver(rig.client)
    assert URL(other.callback_url("http://h.example/")).query[SECRET_PARAM] != secret


async def test_explicit_secret_is_used_and_checked(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    shared = "a-stable-secret-from-config-0123"
    receiver = CallbackReceiver(rig.client, secret=shared)
    assert URL(receiver.callback_url("http://h.example/cb")).query[SECRET_PARAM] == shared
    assert shared not in repr(receiver)
    for bad in ("short", "   tiny-secret    "):
        with pytest.raises(ValueError, match="secret") as info:
            CallbackReceiver(rig.client, secret=bad)
        assert bad not in str(info.value)
    for name, bad in (
        ("max_body_size", 0),
        ("max_concurrency", True),
        ("max_pending", 2.5),
    ):
        with pytest.raises(ValueError, match=name):
            CallbackReceiver(rig.client, **{name: bad})  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the fast path


async def test_callback_finishes_the_wait_without_polling(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    submission = await rig.client.generate("a cat", callback_url=rig.url)
    assert rig.server.tasks[submission.task_id].callback_url == rig.url
    urls = await rig.client.await_completion(submission, timeout=WAIT)
    assert urls == rig.server.tasks[submission.task_id].image_urls
    # The lazy poll is 60 s away: only the callback and its one confirmation ran.
    assert rig.server.counts["retrieve_batch"] == 0
    assert rig.server.counts["retrieve"] == 1
    assert [d.status for d in rig.server.callback_deliveries] == [200]
    await drain(rig.receiver)
    assert (rig.receiver.stats.accepted, rig.receiver.stats.resolved) == (1, 1)


async def test_failed_task_callback_resolves_with_the_failure(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    submission = await rig.client.generate("a cat [fail]", callback_url=rig.url)
    task = await rig.client.wait(submission, timeout=WAIT)
    assert task.state is TaskState.FAILED
    assert task.failure is not None
    assert task.failure.code == "forbidden"
    assert rig.server.counts["retrieve_batch"] == 0


async def test_as_completed_is_fed_by_callbacks(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    ids = [rig.add_task(duration=0.1 + i / 50) for i in range(10)]
    seen = [task.id async for task in rig.client.as_completed(map(rig.submission, ids))]
    assert sorted(seen) == sorted(ids)
    assert rig.server.counts["retrieve_batch"] == 0


# --------------------------------------------------------------------------- forged callbacks


@pytest.mark.parametrize("secret", [None, "", "wrong-secret-of-a-decent-length", "é" * 20])
async def test_wrong_or_missing_secret_is_401_and_changes_nothing(
    make_rig: RigFactory, secret: str | None
) -> None:
    rig: Rig = await make_rig()
    task_id = rig.add_task(duration=60.0)
    waiter = asyncio.create_task(rig.client.wait(rig.submission(task_id), timeout=WAIT))
    assert await rig.post(forged(task_id), secret=secret) == 401
    await asyncio.sleep(0.05)
    assert not waiter.done()
    assert rig.server.counts["retrieve"] == 0
    assert rig.receiver.stats.unauthorized == 1
    assert rig.receiver.stats.accepted == 0
    rig.server.finish(task_id)  # the genuine delivery still works afterwards
    task = await waiter
    assert task.image_urls == rig.server.tasks[task_id].image_urls


async def test_undecodable_secret_is_401(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    raw = URL(rig.endpoint + f"?{SECRET_PARAM}=%ff%fe%ed%a0%80", encoded=True)
    async with rig.http.post(raw, data=json.dumps(forged("t")).encode()) as response:
        assert response.status == 401
    assert rig.receiver.stats.unauthorized == 1


async def test_right_secret_but_forged_urls_resolve_with_the_services_record(
    make_rig: RigFactory,
) -> None:
    rig: Rig = await make_rig()
    rig.server.drop_callbacks(1)  # the genuine delivery is lost ...
    task_id = rig.add_task(duration=0.05)
    waiter = asyncio.create_task(rig.client.wait(rig.submission(task_id), timeout=WAIT))
    await wait_until(lambda: rig.server.callbacks_dropped == 1)
    assert await rig.post(forged(task_id)) == 200  # ... and a forged one claims the task
    task = await waiter
    assert EVIL not in task.image_urls
    assert task.image_urls == rig.server.tasks[task_id].image_urls
    assert rig.server.counts["retrieve"] == 1


async def test_premature_forged_callback_leaves_the_task_pending(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    task_id = rig.add_task(duration=60.0)
    waiter = asyncio.create_task(rig.client.wait(rig.submission(task_id), timeout=WAIT))
    await asyncio.sleep(0)
    assert await rig.post(forged(task_id)) == 200
    await drain(rig.receiver)
    assert not waiter.done()
    assert rig.receiver.stats.ignored == 1
    rig.server.finish(task_id)
    assert EVIL not in (await waiter).image_urls


async def test_without_verify_the_body_is_trusted_and_nothing_is_read(
    make_rig: RigFactory,
) -> None:
    rig: Rig = await make_rig(verify=False)
    submission = await rig.client.generate("a cat", callback_url=rig.url)
    urls = await rig.client.await_completion(submission, timeout=WAIT)
    assert urls == rig.server.tasks[submission.task_id].image_urls
    # A trusted body also serves a wait that starts just after it arrived.
    early = rig.add_task(duration=0.0)
    await wait_until(lambda: len(rig.server.callback_deliveries) == 2)
    await drain(rig.receiver)
    task = await rig.client.wait(rig.submission(early), timeout=WAIT)
    assert task.image_urls == rig.server.tasks[early].image_urls
    assert rig.server.counts["retrieve"] == rig.server.counts["retrieve_batch"] == 0


# --------------------------------------------------------------------------- lost, duplicate, late


async def test_lost_callback_costs_latency_not_a_hang(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig(callback_poll_interval=0.5)
    rig.server.drop_callbacks(1)
    submission = await rig.client.generate("a cat", callback_url=rig.url)
    urls = await rig.client.await_completion(submission, timeout=WAIT)
    assert urls == rig.server.tasks[submission.task_id].image_urls
    assert rig.server.callbacks_dropped == 1
    assert rig.server.counts["retrieve_batch"] >= 1
    assert rig.receiver.stats.accepted == 0


async def test_a_failing_confirmation_is_answered_200_and_polling_finishes(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig: Rig = await make_rig(callback_poll_interval=0.5)
    rig.server.inject("error", status=500, action="retrieve", times=4)  # 1 try + 3 retries
    submission = await rig.client.generate("a cat", callback_url=rig.url)
    urls = await rig.client.await_completion(submission, timeout=WAIT)
    assert urls == rig.server.tasks[submission.task_id].image_urls
    assert [d.status for d in rig.server.callback_deliveries] == [200]
    await drain(rig.receiver)
    assert rig.receiver.stats.failed == 1
    assert any("polling carries on" in r.getMessage() for r in caplog.records)


async def test_duplicate_callbacks_resolve_once(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    rig.server.drop_callbacks(1)
    task_id = rig.add_task(duration=0.0)
    await wait_until(lambda: rig.server.callbacks_dropped == 1)
    updates: list[Task] = []
    waiter = asyncio.create_task(
        rig.client.wait(rig.submission(task_id), timeout=WAIT, on_update=updates.append)
    )
    await asyncio.sleep(0)
    body = rig.server.tasks[task_id].result()
    statuses = await asyncio.gather(*(rig.post(body) for _ in range(20)))
    assert statuses == [200] * 20
    task = await waiter
    assert task.image_urls == rig.server.tasks[task_id].image_urls
    assert len(updates) == 1
    await drain(rig.receiver)
    stats = rig.receiver.stats
    assert stats.accepted + stats.duplicates == 20
    assert stats.resolved == 1
    # A late copy, after the wait is over, is answered and ignored without a request.
    retrieves = rig.server.counts["retrieve"]
    assert await rig.post(body) == 200
    await drain(rig.receiver)
    assert rig.server.counts["retrieve"] == retrieves
    assert stats.ignored == stats.accepted - 1


async def test_callback_after_polling_won_is_ignored(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    rig.server.drop_callbacks(1)
    task_id = rig.add_task(duration=0.0)
    task = await rig.client.wait(task_id, timeout=WAIT)  # a plain id: eager polling
    assert await rig.post(rig.server.tasks[task_id].result()) == 200
    await drain(rig.receiver)
    assert rig.receiver.stats.ignored == 1
    assert rig.server.counts["retrieve"] == 0
    assert task.done


async def test_callbacks_for_tasks_nobody_waits_on(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    known = rig.add_task(duration=0.0)  # the service's own delivery, nobody waiting
    await wait_until(lambda: len(rig.server.callback_deliveries) == 1)
    assert rig.server.callback_deliveries[0].status == 200
    assert await rig.post(forged("no-such-task")) == 200
    await drain(rig.receiver)
    assert rig.receiver.stats.ignored == 2
    assert rig.server.counts["retrieve"] == 0
    # Whoever waits on it later simply reads it.
    assert (await rig.client.wait(known, timeout=WAIT)).done


# --------------------------------------------------------------------------- bad bodies


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"\xff\xfe\x00garbage",
        b"[1, 2, 3]",
        b'"a string"',
        b"{}",
        b'{"success": true}',
        b'{"task_id": 17}',
        b'{"task_id": ""}',
        b'{"task_id": "t", "data": "not a list"}',
        b"[" * 50_000,
    ],
)
async def test_malformed_bodies_are_400(make_rig: RigFactory, body: bytes) -> None:
    rig: Rig = await make_rig()
    assert await rig.post(body) == 400
    assert rig.receiver.stats.malformed == 1
    assert rig.receiver.pending == 0


@pytest.mark.parametrize("verify", [True, False])
async def test_bodies_no_callback_could_be_are_400_before_any_work(
    make_rig: RigFactory, verify: bool
) -> None:
    """Found in review: a forged id of 255 KiB was kept for the client's life, and a
    body listing thousands of images was structured on the event loop."""
    rig: Rig = await make_rig(verify=verify)
    assert await rig.post(forged("x" * 257)) == 400
    many = {**forged("t"), "data": [{"image_url": EVIL}] * 17}
    assert await rig.post(many) == 400
    assert rig.receiver.stats.malformed == 2
    assert rig.server.counts["retrieve"] == 0


async def test_with_verify_the_body_is_only_a_hint(make_rig: RigFactory) -> None:
    """Only the id of a verified delivery is kept (the record comes from retrieve), so
    a body whose other fields are odd still leads to the service's own record."""
    rig: Rig = await make_rig(duration=0.05)
    task_id = rig.add_task()
    waiting = asyncio.ensure_future(rig.client.wait(rig.submission(task_id), timeout=WAIT))
    await wait_until(lambda: rig.client._poller.watching(task_id))
    await asyncio.sleep(0.1)  # done on the service by now
    assert await rig.post({"task_id": task_id, "success": "yes", "data": [{"x": 1}]}) == 200
    task = await waiting
    assert task.image_urls == rig.server.tasks[task_id].image_urls
    assert rig.receiver.stats.resolved == 1


async def test_refusals_are_logged_once_then_counted(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nanobanana_async.webhooks")
    rig: Rig = await make_rig()
    for _ in range(20):
        assert await rig.post(forged("t"), secret="wrong-secret-of-a-decent-length") == 401
    refused = [r for r in caplog.records if "wrong or missing secret" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.INFO] + [logging.DEBUG] * 19
    assert rig.receiver.stats.unauthorized == 20
    # A delivery with the right secret ends the run: the next wrong one is news again
    # (a replica deployed with another secret, say, after scanners hit the URL early).
    caplog.clear()
    assert await rig.post(forged("t")) == 200
    assert await rig.post(forged("t"), secret="wrong-secret-of-a-decent-length") == 401
    refused = [r for r in caplog.records if "wrong or missing secret" in r.getMessage()]
    assert [r.levelno for r in refused] == [logging.INFO]


async def test_oversized_bodies_are_413(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig(max_body_size=1024)
    big = json.dumps({**forged("t"), "pad": "x" * 2000}).encode()
    assert await rig.post(big) == 413  # refused on Content-Length

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 100):
            yield big[start : start + 100]

    async with rig.http.post(rig.url, data=chunks()) as response:  # chunked: no length
        assert response.status == 413
    assert await rig.post(forged("t")) == 200
    assert rig.receiver.stats.too_large == 2
    assert rig.server.counts["retrieve"] == 0


# --------------------------------------------------------------------------- framework-neutral


async def test_receive_is_framework_neutral_and_never_raises(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig(max_body_size=4096)
    secret = URL(rig.url).query[SECRET_PARAM]
    rig.server.drop_callbacks(1)
    task_id = rig.add_task(duration=0.0)
    await wait_until(lambda: rig.server.callbacks_dropped == 1)
    waiter = asyncio.create_task(rig.client.wait(rig.submission(task_id), timeout=WAIT))
    body = json.dumps(rig.server.tasks[task_id].result())
    receive = rig.receiver.receive
    assert await receive(body.encode(), secret=None) == 401
    assert await receive(body.encode(), secret=secret + "x") == 401
    assert await receive(body.encode(), secret="\ud800\udcff" * 20) == 401
    assert await receive("{", secret=secret) == 400
    assert await receive("x" * 5000, secret=secret) == 413
    assert await receive(body, secret=secret) == 200  # str is fine too
    assert (await waiter).image_urls == rig.server.tasks[task_id].image_urls
    await rig.receiver.aclose()
    assert await receive(body, secret=secret) == 503
    assert await rig.post(body.encode()) == 503


async def test_overload_is_refused_with_503(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig(max_concurrency=1, max_pending=2, callback_poll_interval=0.5)
    rig.server.inject("slow", action="retrieve", delay=0.5, times=10)
    ids = [rig.add_task(duration=60.0) for _ in range(3)]
    waiters = [asyncio.create_task(rig.client.wait(rig.submission(i), timeout=WAIT)) for i in ids]
    for task_id in ids:
        rig.server.drop_callbacks(1)
        rig.server.finish(task_id)
    await wait_until(lambda: rig.server.callbacks_dropped == 3)
    statuses = [await rig.post(rig.server.tasks[i].result()) for i in ids]
    assert statuses == [200, 200, 503]
    assert rig.receiver.stats.rejected == 1
    done = await asyncio.gather(*waiters)  # the refused one finishes by polling
    assert all(task.done for task in done)


# --------------------------------------------------------------------------- load and shutdown


async def test_receiver_under_1000_concurrent_callbacks(make_rig: RigFactory) -> None:
    rig: Rig = await make_rig()
    ids = [rig.add_task(duration=1.0) for _ in range(1000)]
    results = await asyncio.gather(*(rig.client.wait(rig.submission(i), timeout=30.0) for i in ids))
    assert {task.id for task in results} == set(ids)
    for task in results:
        assert task.image_urls == rig.server.tasks[task.id].image_urls
    assert rig.server.counts["retrieve_batch"] == 0  # every wait finished by its callback
    deliveries = rig.server.callback_deliveries
    assert len(deliveries) == 1000
    assert {d.status for d in deliveries} == {200}
    await drain(rig.receiver)
    assert rig.receiver.stats.resolved == 1000
    assert rig.server.counts["retrieve"] == 1000


async def test_shutdown_while_callbacks_arrive(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    rig: Rig = await make_rig()
    rig.server.inject("slow", action="retrieve", delay=5.0, times=1000)
    ids = [rig.add_task(duration=0.2) for _ in range(300)]
    waiters = [asyncio.create_task(rig.client.wait(rig.submission(i), timeout=WAIT)) for i in ids]
    await wait_until(lambda: rig.receiver.stats.accepted >= 20)
    # The app shuts down mid-stream; its receiver stops first, then the client.
    await asyncio.wait_for(rig.receiver.aclose(timeout=0.1), WAIT)
    await asyncio.wait_for(rig.runner.cleanup(), WAIT)
    await rig.client.aclose()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(o, ClientClosedError) for o in outcomes), outcomes[:3]
    assert rig.receiver.closed
    assert rig.receiver.pending == 0
    assert leftover_callback_tasks() == []
    assert all(
        d.status in (200, 503) or d.error is not None for d in rig.server.callback_deliveries
    )
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors]
    await rig.receiver.aclose()  # twice is fine


async def test_the_secret_and_token_never_reach_the_logs(
    make_rig: RigFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    rig: Rig = await make_rig(callback_poll_interval=0.5)
    secret = URL(rig.url).query[SECRET_PARAM]
    rig.server.inject("error", status=500, action="retrieve", times=4)
    submission = await rig.client.generate("a cat", callback_url=rig.url)
    await rig.client.await_completion(submission, timeout=WAIT)
    await rig.post(forged(submission.task_id), secret="wrong-secret-of-a-decent-length")
    await rig.post(b"garbage")
    await drain(rig.receiver)
    assert caplog.records
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + str(record.exc_text)
        assert secret not in text
        assert rig.server.token not in text
    assert secret not in repr(submission)
