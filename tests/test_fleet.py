"""Callbacks relayed between replicas over a real Redis (issue 11).

Every test here runs a real ``redis-server`` (Debian's ``redis-server`` package) on a
free loopback port. Without one the tests are skipped locally, and fail when
``NANOBANANA_REQUIRE_REDIS`` or ``CI`` is set (``.ci/run`` sets it and installs Redis).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, suppress
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import attrs
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from nanobanana_async import (
    ClientClosedError,
    ErrorDetail,
    ImageResult,
    NanoBananaClient,
    RetryPolicy,
    Submission,
    Task,
    TaskResponse,
    TaskState,
)
from nanobanana_async.testing import FakeNanoBanana
from nanobanana_async.webhooks import DEFAULT_PATH, CallbackReceiver

REQUIRED = bool(os.environ.get("NANOBANANA_REQUIRE_REDIS") or os.environ.get("CI"))


def _missing(what: str) -> None:
    message = f"{what}; install it (apt-get install redis-server, pip install -e '.[test]')"
    if REQUIRED:
        pytest.fail(f"{message}: NANOBANANA_REQUIRE_REDIS/CI demands these tests run")
    pytest.skip(message, allow_module_level=True)


try:
    import redis.asyncio as aioredis

    from nanobanana_async.fleet import (
        RedisRelay,
        RelayDecodeError,
        decode_record,
        encode_record,
    )
except ImportError:  # pragma: no cover - depends on the environment
    _missing("the redis package is not installed")

REDIS_SERVER = shutil.which("redis-server")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 15.0  # upper bound for every wait here
SECRET = "a-secret-every-replica-shares-0123456789"
EVIL = "https://evil.example/injected.png"
MAX_SIZE = 64 * 1024


# --------------------------------------------------------------------------- a real Redis


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A ``redis-server`` child on 127.0.0.1 that a test can kill and start again."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        """Start it (on the same port as before, if it ran before) and wait until it answers."""
        assert REDIS_SERVER is not None
        with (self.workdir / "redis.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.workdir),
                "--daemonize", "no",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
        async with asyncio.timeout(WAIT):
            while not await self._answers():
                if self.process.returncode is not None:
                    log_text = (self.workdir / "redis.log").read_text(errors="replace")
                    raise RuntimeError(f"redis-server exited: {log_text[-2000:]}")
                await asyncio.sleep(0.02)

    async def _answers(self) -> bool:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        except OSError:
            return False
        try:
            writer.write(b"PING\r\n")
            await writer.drain()
            return await reader.readline() == b"+PONG\r\n"
        except OSError:
            return False
        finally:
            writer.close()
            await writer.wait_closed()

    async def kill(self) -> None:
        """SIGKILL: no goodbye to the clients, as when a Redis host dies."""
        process, self.process = self.process, None
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    if REDIS_SERVER is None:
        _missing("redis-server is not on PATH")
    server = RedisServer(tmp_path)
    for attempt in range(3):  # another process may take the free port first
        try:
            await server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = free_port()
    try:
        yield server
    finally:
        await server.kill()


# --------------------------------------------------------------------------- the codec

texts = st.text(max_size=12)
floats = st.none() | st.floats(allow_nan=False, allow_infinity=False)
json_leaves = st.none() | st.booleans() | st.integers() | floats | texts
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(texts, children, max_size=3),
    max_leaves=8,
)
errors = st.none() | st.builds(ErrorDetail, code=st.none() | texts, message=st.none() | texts)
tasks = st.builds(
    Task,
    id=st.text(min_size=1, max_size=36).filter(str.strip),
    created_at=floats,
    started_at=floats,
    finished_at=floats,
    elapsed=floats,
    trace_id=st.none() | texts,
    type=st.none() | texts,
    request=st.none() | st.dictionaries(texts, json_values, max_size=3),
    response=st.none()
    | st.builds(
        TaskResponse,
        success=st.none() | st.booleans(),
        task_id=st.none() | texts,
        trace_id=st.none() | texts,
        data=st.lists(
            st.builds(ImageResult, image_url=st.none() | texts, prompt=st.none() | texts),
            max_size=3,
        ),
        error=errors,
    ),
    error=errors,
)


@given(tasks)
def test_a_record_survives_the_channel_without_its_request(task: Task) -> None:
    message = encode_record(task, origin="me", max_size=MAX_SIZE)
    assert message is not None
    assert decode_record(message, max_size=MAX_SIZE) == ("me", attrs.evolve(task, request=None))


def test_the_request_echo_never_goes_on_the_channel_and_a_huge_record_not_at_all() -> None:
    # Found in review: the echo holds the callback URL, and so the receivers' shared
    # secret, which anyone who can SUBSCRIBE then read.
    task = Task(
        id="t",
        request={
            "callback_url": f"https://svc.example/cb?nb_secret={SECRET}",
            "image_urls": ["data:image/png;base64," + "A" * 100_000],
        },
        response=TaskResponse(success=True, data=[ImageResult(image_url="https://cdn/x.png")]),
    )
    message = encode_record(task, origin="me", max_size=MAX_SIZE)
    assert message is not None
    assert SECRET.encode() not in message
    assert decode_record(message, max_size=MAX_SIZE)[1] == attrs.evolve(task, request=None)
    huge = Task(id="t", trace_id="x" * 100_000)
    assert encode_record(huge, origin="me", max_size=MAX_SIZE) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1, 2]",
        b"[" * 100_000,
        b'{"v": 2, "origin": "x", "task": {"id": "t"}}',
        b'{"v": true, "origin": "x", "task": {"id": "t"}}',
        b'{"v": 1, "task": {"id": "t"}}',
        b'{"v": 1, "origin": "x"}',
        b'{"v": 1, "origin": "x", "task": {"id": "t", "response": {"success": 1}}}',
        b'{"v": 1, "origin": "x", "task": {"id": "  "}}',
        b'{"v": 1, "origin": "x", "task": {"id": "t", "response": {"data": "str"}}}',
        b'{"v": 1, "origin": "x", "task": {"id": "t", "pad": "' + b"x" * MAX_SIZE + b'"}}',
    ],
)
def test_what_is_not_a_relayed_record_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(RelayDecodeError):
        decode_record(data, max_size=MAX_SIZE)


@given(st.binary(max_size=64) | json_values.map(lambda value: json.dumps(value).encode()))
def test_garbage_raises_only_decode_errors(data: bytes) -> None:
    with suppress(RelayDecodeError):
        decode_record(data, max_size=MAX_SIZE)


# ------------------------------------------------------------------------ replicas in one process


@attrs.define
class Replica:
    """One replica: a client, its relay and a receiver on a real local HTTP server."""

    client: NanoBananaClient
    relay: RedisRelay
    receiver: CallbackReceiver
    endpoint: str  # where its receiver listens, without the secret

    def url(self) -> str:
        """A callback URL that reaches this replica (any replica's receiver builds it)."""
        return self.receiver.callback_url(self.endpoint)


Build = Callable[..., Any]


@attrs.define
class Fleet:
    server: FakeNanoBanana
    build: Build


@pytest.fixture
async def fleet(redis_server: RedisServer) -> AsyncIterator[Fleet]:
    """A fake service and a factory of replicas sharing ``redis_server``; all closed after."""
    async with AsyncExitStack() as stack:
        server = await stack.enter_async_context(FakeNanoBanana(duration=0.05))

        async def build(
            *,
            verify: bool = True,
            callback_poll_interval: float = 60.0,
            channel: str = "test-fleet",
            start: bool = True,
        ) -> Replica:
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
            relay = RedisRelay(client, redis_server.url, channel=channel, max_reconnect_wait=0.2)
            stack.push_async_callback(relay.aclose)
            receiver = CallbackReceiver(client, secret=SECRET, verify=verify, relay=relay)
            app = web.Application()
            receiver.add_route(app)
            runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1)
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            if start:
                await relay.start()
                assert relay.connected
            endpoint = f"http://127.0.0.1:{runner.addresses[0][1]}{DEFAULT_PATH}"
            return Replica(client, relay, receiver, endpoint)

        yield Fleet(server, build)


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls plain state, no event to await
            await asyncio.sleep(0.005)


async def test_a_callback_on_one_replica_finishes_the_wait_on_another(fleet: Fleet) -> None:
    a, b = await fleet.build(), await fleet.build()
    # A submits; the balancer sends the callback to B.
    submission = await a.client.generate("a cat", callback_url=b.url())
    async with asyncio.timeout(WAIT):
        urls = await a.client.await_completion(submission)
        await b.receiver.drain()
    assert urls == fleet.server.tasks[submission.task_id].image_urls
    # One confirmation, by B; no poll (the lazy one is 60 s away); A trusted the relay.
    assert fleet.server.counts["retrieve"] == 1
    assert fleet.server.counts["retrieve_batch"] == 0
    assert b.receiver.stats.relayed == 1
    assert b.receiver.stats.resolved == 0  # nobody waits on B
    assert a.relay.stats.received == 1
    assert a.relay.stats.resolved == 1
    assert b.relay.stats.received == 0  # its own message is not fed back to it
    assert a.receiver.stats.accepted == 0


async def test_failures_and_many_tasks_are_relayed(fleet: Fleet) -> None:
    replicas = [await fleet.build() for _ in range(3)]
    subs: list[tuple[NanoBananaClient, Submission]] = []
    for i in range(12):
        owner, receiver = replicas[i % 3], replicas[(i + 1) % 3]
        prompt = "refused [fail]" if i % 4 == 0 else f"picture {i}"
        submission = await owner.client.generate(prompt, callback_url=receiver.url())
        subs.append((owner.client, submission))
    async with asyncio.timeout(WAIT):
        done = await asyncio.gather(*(client.wait(sub) for client, sub in subs))
    for task, (_, sub) in zip(done, subs, strict=True):
        fake = fleet.server.tasks[sub.task_id]
        assert task.id == sub.task_id
        assert task.state is (TaskState.FAILED if "[fail]" in fake.prompt else TaskState.SUCCEEDED)
        assert task.image_urls == fake.image_urls
    assert fleet.server.counts["retrieve"] == 12
    assert fleet.server.counts["retrieve_batch"] == 0
    assert sum(r.relay.stats.resolved for r in replicas) == 12


async def test_a_forged_body_is_relayed_as_the_services_record(fleet: Fleet) -> None:
    a, b = await fleet.build(), await fleet.build()
    fleet.server.drop_callbacks(1)  # the genuine delivery is lost ...
    submission = await a.client.generate("a cat", callback_url=b.url())
    waiting = asyncio.create_task(a.client.await_completion(submission))
    await wait_until(lambda: fleet.server.callbacks_dropped == 1)
    forged = {"success": True, "task_id": submission.task_id, "data": [{"image_url": EVIL}]}
    async with aiohttp.ClientSession() as http, http.post(b.url(), json=forged) as answer:
        assert answer.status == 200  # ... and a forger with the secret posts this one
    async with asyncio.timeout(WAIT):
        urls = await waiting
    assert urls == fleet.server.tasks[submission.task_id].image_urls
    assert EVIL not in urls
    unknown = {"success": True, "task_id": "no-such-task", "data": [{"image_url": EVIL}]}
    assert await b.receiver.receive(json.dumps(unknown), secret=SECRET) == 200
    async with asyncio.timeout(WAIT):
        await b.receiver.drain()
    assert b.relay.stats.published == 1  # the unknown id was not relayed


async def test_a_premature_callback_makes_the_owner_poll_eagerly(fleet: Fleet) -> None:
    a, b = await fleet.build(), await fleet.build()
    task_id = fleet.server.add_task(duration=3600.0)  # far from done
    waiting = asyncio.create_task(a.client.wait(Submission(task_id, callback_url=b.url())))
    await wait_until(lambda: a.client._poller.watching(task_id))
    premature = {"success": True, "task_id": task_id, "data": [{"image_url": EVIL}]}
    assert await b.receiver.receive(json.dumps(premature), secret=SECRET) == 200
    async with asyncio.timeout(WAIT):
        await b.receiver.drain()
    await wait_until(lambda: a.relay.stats.received == 1)
    # The pending record made A poll at once, not 60 s from now; the task finishes
    # later and A's polling sees it.
    await wait_until(lambda: fleet.server.counts["retrieve_batch"] >= 1)
    fleet.server.finish(task_id)
    async with asyncio.timeout(WAIT):
        task = await waiting
    assert task.image_urls == fleet.server.tasks[task_id].image_urls


async def test_without_verify_the_body_is_relayed_and_nothing_is_read(fleet: Fleet) -> None:
    a, b = await fleet.build(verify=False), await fleet.build(verify=False)
    submission = await a.client.generate("a cat", callback_url=b.url())
    async with asyncio.timeout(WAIT):
        urls = await a.client.await_completion(submission)
    assert urls == fleet.server.tasks[submission.task_id].image_urls
    assert fleet.server.counts["retrieve"] == 0
    assert fleet.server.counts["retrieve_batch"] == 0


async def test_a_record_relayed_before_the_wait_starts_is_kept_for_it(fleet: Fleet) -> None:
    a, b = await fleet.build(), await fleet.build()
    task_id = fleet.server.add_task(callback_url=b.url(), duration=0.0)
    await wait_until(lambda: a.relay.stats.received == 1)
    async with asyncio.timeout(WAIT):
        task = await a.client.wait(Submission(task_id, callback_url=b.url()))
    assert task.image_urls == fleet.server.tasks[task_id].image_urls
    assert fleet.server.counts["retrieve_batch"] == 0


async def test_foreign_and_malformed_messages_hurt_nothing(
    fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = await fleet.build(), await fleet.build()
    junk = [
        b"hello",
        b"\xff" * 10,
        b"{}",
        b'{"v": 1, "origin": "evil", "task": {"id": "t", "response": {"success": 7}}}',
        b"[" * 50_000,
        b"x" * (300 * 1024),
        json.dumps({"v": 1, "origin": "x", "task": {"id": "not-watched"}}).encode(),
    ]
    caplog.set_level(logging.DEBUG, logger="nanobanana_async.fleet")
    publisher = aioredis.Redis.from_url(redis_server.url)
    try:
        for data in junk:
            await publisher.publish("test-fleet", data)
    finally:
        await publisher.aclose()
    await wait_until(lambda: a.relay.stats.malformed == 6 and b.relay.stats.malformed == 6)
    assert a.relay.stats.received == 1  # the well-formed one, for a task nobody waits on
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 2  # one per relay, not one per message
    # Both relays still work.
    submission = await a.client.generate("a cat", callback_url=b.url())
    async with asyncio.timeout(WAIT):
        assert await a.client.await_completion(submission)
    assert a.relay.stats.resolved == 1


async def test_another_channel_is_another_fleet(fleet: Fleet) -> None:
    a, b = await fleet.build(channel="one"), await fleet.build(channel="two")
    task_id = fleet.server.add_task(callback_url=b.url(), duration=0.0)
    await wait_until(lambda: b.relay.stats.published == 1)
    await asyncio.sleep(0.1)  # a stray message would have arrived by now
    assert a.relay.stats.received == 0
    assert not a.client._poller.watching(task_id)


async def test_a_relay_needs_an_explicit_shared_secret(
    fleet: Fleet, redis_server: RedisServer
) -> None:
    a = await fleet.build()
    with pytest.raises(ValueError, match="explicit secret"):
        CallbackReceiver(a.client, relay=a.relay)
    async with NanoBananaClient("t", base_url="http://127.0.0.1:9") as other:
        with pytest.raises(ValueError, match="receiver's client"):
            CallbackReceiver(other, secret=SECRET, relay=a.relay)
    for bad in (
        {"channel": ""},
        {"max_message_size": 10},
        {"max_message_size": 4096.5},
        {"max_reconnect_wait": 0},
        {"max_reconnect_wait": float("nan")},
        {"connect_timeout": float("inf")},
    ):
        with pytest.raises(ValueError, match=r"channel|max_|connect_timeout"):
            RedisRelay(a.client, redis_server.url, **bad)
    with pytest.raises(ValueError, match="redis://"):
        RedisRelay(a.client, "http://not-redis.example")


async def test_close_is_clean_and_final(fleet: Fleet, redis_server: RedisServer) -> None:
    a = await fleet.build()
    relay = RedisRelay(a.client, redis_server.url)
    assert "not started" in repr(relay)
    assert not await relay.publish(Task(id="t"))  # not started: skipped
    async with relay:
        assert relay.connected
        assert "connected" in repr(relay)
        await relay.start()  # a second start does nothing
        assert await relay.publish(Task(id="t"))
    assert not relay.connected
    assert "closed" in repr(relay)
    await relay.aclose()  # twice is fine
    assert not await relay.publish(Task(id="t"))
    with pytest.raises(ClientClosedError):
        await relay.start()
    assert relay.stats.published == 1
    assert relay.stats.unpublished == 2
    left = [t for t in asyncio.all_tasks() if t.get_name() == "nanobanana-async relay"]
    assert len(left) == 1  # a's own relay; this one's task is gone


async def test_a_failing_publish_is_logged_once_and_never_raises(
    fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    admin = aioredis.Redis.from_url(redis_server.url)
    try:  # a user that may listen but not publish
        await admin.execute_command(
            "ACL", "SETUSER", "listener", "on", ">s3cret-pw-xyz", "~*", "&*", "+@all", "-publish"
        )
    finally:
        await admin.aclose()
    a = await fleet.build()
    url = f"redis://listener:s3cret-pw-xyz@127.0.0.1:{redis_server.port}/0"
    async with RedisRelay(a.client, url, channel="test-fleet", keepalive=0.1) as relay:
        assert relay.connected
        assert "s3cret" not in repr(relay)
        for _ in range(3):
            assert not await relay.publish(Task(id="t"))
        assert relay.stats.unpublished == 3
        # Redis answered "no": the link is fine. (It once read as an outage, and the
        # relay flapped between down and up with a warning per callback.)
        await asyncio.sleep(0.3)
        assert relay.connected
        assert relay.stats.disconnects == 0
    down = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(down) == 1
    assert "NoPermission" in down[0].getMessage()
    assert "is down" not in caplog.text
    assert "s3cret" not in caplog.text


# --------------------------------------------------------------------------- Redis going away


async def test_redis_restart_loses_no_waiter_and_the_relay_resumes(
    fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="nanobanana_async.fleet")
    a = await fleet.build(callback_poll_interval=0.3)
    b = await fleet.build(callback_poll_interval=0.3)
    await redis_server.kill()
    await wait_until(lambda: not a.relay.connected and not b.relay.connected)

    # Redis is down: callbacks reach B, which cannot relay them; A's waits finish by polling.
    subs = [await a.client.generate(f"cat {i}", callback_url=b.url()) for i in range(5)]
    async with asyncio.timeout(WAIT):
        urls = await asyncio.gather(*(a.client.await_completion(s) for s in subs))
        await b.receiver.drain()
    assert urls == [fleet.server.tasks[s.task_id].image_urls for s in subs]
    # B knew the relay was down: it handled them as a lone process would, reading
    # nothing for tasks it does not wait on.
    assert b.receiver.stats.relayed == 0
    assert fleet.server.counts["retrieve"] == 0
    assert a.relay.stats.resolved == 0
    down = [r for r in caplog.records if "is down" in r.getMessage()]
    assert len(down) == 2  # once per relay, however many callbacks and reconnect attempts
    assert a.relay.stats.disconnects == 1

    # Redis is back on the same address: both relays resume by themselves.
    await redis_server.start()
    async with asyncio.timeout(WAIT):
        await a.relay.wait_connected()
        await b.relay.wait_connected()
    assert len([r for r in caplog.records if "connected again" in r.getMessage()]) == 2
    submission = await a.client.generate("a dog", callback_url=b.url())
    async with asyncio.timeout(WAIT):
        assert await a.client.await_completion(submission)
    await wait_until(lambda: a.relay.stats.received == 1)
    assert b.relay.stats.published == 1


class Blackhole:
    """A TCP proxy to Redis that can go silent: it stops carrying bytes either way
    without closing anything, as a NAT's idle timeout or a vanished host does."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.silent = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self.handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        handler.add_done_callback(self.handlers.discard)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with suppress(OSError):
                while data := await source.read(65536):
                    if not self.silent:  # silent: swallowed, and nobody is told
                        sink.write(data)
                        await sink.drain()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            for end in (writer, up_writer):
                end.close()

    async def aclose(self) -> None:
        if self.server is not None:
            self.server.close()
            for handler in list(self.handlers):
                handler.cancel()
            if self.handlers:
                await asyncio.wait(list(self.handlers))
            await self.server.wait_closed()


@pytest.mark.parametrize("noticed_by", ["keepalive", "a failed publish"])
async def test_a_link_gone_silent_is_noticed_and_the_relay_reconnects(
    fleet: Fleet, redis_server: RedisServer, noticed_by: str
) -> None:
    """Found in review: a connection that stops carrying bytes without a reset left
    the relay "connected" and deaf for ever; a failed publish did not mend it either."""
    proxy = Blackhole(redis_server.port)
    await proxy.start()
    keepalive = 0.2 if noticed_by == "keepalive" else 60.0
    try:
        async with NanoBananaClient(fleet.server.token, base_url=fleet.server.base_url) as client:
            url = f"redis://127.0.0.1:{proxy.port}/0"
            relay = RedisRelay(
                client, url, keepalive=keepalive, connect_timeout=0.5, max_reconnect_wait=0.2
            )
            async with relay:
                assert relay.connected
                proxy.silent = True
                if noticed_by == "a failed publish":
                    async with asyncio.timeout(2.0):  # bounded by connect_timeout
                        assert not await relay.publish(Task(id="t"))
                await wait_until(lambda: relay.stats.disconnects == 1)
                assert not relay.connected
                assert not await relay.publish(Task(id="t"))  # skipped while down
                proxy.silent = False  # new connections carry bytes again
                async with asyncio.timeout(WAIT):
                    await relay.wait_connected()
                assert await relay.publish(Task(id="t"))
    finally:
        await proxy.aclose()


async def test_a_relay_started_while_redis_is_down_connects_later(
    fleet: Fleet, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await redis_server.kill()
    a = await fleet.build(start=False, callback_poll_interval=0.3)
    b = await fleet.build(start=False, callback_poll_interval=0.3)
    async with asyncio.timeout(WAIT):
        await a.relay.start()  # returns after the first (refused) attempt
        await b.relay.start()
    assert not a.relay.connected
    assert len([r for r in caplog.records if "is down" in r.getMessage()]) == 2
    submission = await a.client.generate("a cat", callback_url=b.url())
    async with asyncio.timeout(WAIT):
        assert await a.client.await_completion(submission)  # by polling
    await redis_server.start()
    async with asyncio.timeout(WAIT):
        await a.relay.wait_connected()
        await b.relay.wait_connected()
    assert a.relay.stats.disconnects == 0  # it never had a connection to lose


# --------------------------------------------------------------------------- four processes


def load_front() -> ModuleType:
    name = "examples_fleet_front"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / "fleet" / "front.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


async def start_replica(
    server: FakeNanoBanana, redis_url: str, front_url: str, log: Path
) -> asyncio.subprocess.Process:
    """``examples/aiohttp_service.py`` as its own process, with the relay."""
    env = dict(os.environ)
    env.update(
        ACEDATACLOUD_API_TOKEN=server.token,
        ACEDATACLOUD_API_BASE_URL=server.base_url,
        NANOBANANA_CALLBACK_SECRET=SECRET,
        NANOBANANA_REDIS_URL=redis_url,
        PYTHONUNBUFFERED="1",
    )
    with log.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(EXAMPLES / "aiohttp_service.py"),
            "--port", "0",
            "--public-url", front_url,
            "--callback-poll-interval", "60",  # so only callbacks can finish the waits
            "--wait", str(WAIT),
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
        )  # fmt: skip
    return process


async def test_four_replica_processes_behind_a_round_robin_front(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    n = 24
    front = load_front()
    upstreams: list[str] = []
    processes: list[asyncio.subprocess.Process] = []
    async with FakeNanoBanana(duration=(0.05, 0.4)) as server:
        runner = web.AppRunner(front.create_front(upstreams), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            front_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            for i in range(4):
                log = tmp_path / f"replica{i}.log"
                processes.append(await start_replica(server, redis_server.url, front_url, log))
            async with asyncio.timeout(WAIT):
                for process in processes:
                    assert process.stdout is not None
                    line = (await process.stdout.readline()).decode()
                    assert line.startswith("listening on http://127.0.0.1:"), line
                    upstreams.append(line.split()[-1])

            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as http:

                async def make(i: int) -> dict[str, Any]:
                    async with http.post(
                        front_url + "/images", json={"prompt": f"picture {i}"}
                    ) as answer:
                        assert answer.status == 200, await answer.text()
                        made: dict[str, Any] = await answer.json()
                        return made

                made = await asyncio.gather(*(make(i) for i in range(n)))
            for answer in made:
                assert answer["image_urls"] == server.tasks[answer["task_id"]].image_urls
            # Every callback was confirmed once, by the replica that got it, and nothing
            # was polled: most waits lived on another replica, and the relay ended them.
            assert server.counts["generate"] == n
            assert server.counts["retrieve"] == n
            assert server.counts["retrieve_batch"] == 0
            assert [d.status for d in server.callback_deliveries] == [200] * n
        finally:
            for process in processes:
                if process.returncode is None:
                    process.send_signal(signal.SIGTERM)
            for i, process in enumerate(processes):
                try:
                    async with asyncio.timeout(WAIT):
                        await process.communicate()
                except TimeoutError:
                    process.kill()
                    await process.wait()
                text = (tmp_path / f"replica{i}.log").read_text(errors="replace")
                assert process.returncode == 0, text
                assert "Traceback" not in text, text
                assert SECRET not in text
            await runner.cleanup()
