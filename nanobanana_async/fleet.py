"""Several replicas behind one public URL: callbacks relayed to every replica over Redis.

A service run as N replicas behind a load balancer gets each callback on one replica
chosen by the balancer, while the wait for that task usually lives on another. Without
help that wait finishes by lazy polling (``callback_poll_interval``, 15 s). A
[`RedisRelay`][] closes the gap with Redis pub/sub: the replica that receives a
delivery confirms it (one ``retrieve``, or the body as it is with ``verify=False``),
settles its own waiters and publishes the record; every replica's relay subscribes and
hands the record to its own client, which settles the waiters it holds and ignores the
rest. Needs the ``redis`` extra: ``pip install "nanobanana-async[redis]"``.

With aiohttp, in a ``cleanup_ctx``::

    async def nanobanana(app: web.Application) -> AsyncIterator[None]:
        async with NanoBananaClient() as client, RedisRelay(client, REDIS_URL) as relay:
            receiver = CallbackReceiver(client, secret=SHARED_SECRET, relay=relay)
            app[CLIENT], app[RECEIVER] = client, receiver
            yield
            await receiver.aclose()

API
    ``RedisRelay(client, redis_url, *, channel="nanobanana-async",
    max_message_size=256 KiB, max_reconnect_wait=5.0, connect_timeout=5.0,
    keepalive=5.0)``;
    ``async with relay:`` or ``await start()`` / ``await aclose()``; ``await publish(task)
    -> bool``; ``connected``; ``await wait_connected()``; ``stats`` ([`RelayStats`][]).

Trust boundary
    Only the replica that receives a delivery checks it with the service; the others
    trust whatever arrives on the channel, since it comes from our own replicas through
    our own Redis. So anyone who can ``PUBLISH`` to that Redis can finish any wait with
    image URLs of their choice: keep it private to the service (password or ACL, and
    ``rediss://`` TLS when it crosses a network you do not own). The channel carries
    task records in the clear, with their image URLs and the prompts in them (never
    the ``request`` echo, which holds the callback URL and its secret); anyone who can
    ``SUBSCRIBE`` reads them. Use one channel per
    deployment (e.g. ``"nanobanana-async:prod"``) when environments share a Redis.

Failures
    The relay is a fast path, never the only one: a task submitted with a callback is
    still polled lazily. If Redis is unreachable (at start, or it restarts), the relay
    logs one warning, skips publishing, reconnects in the background with capped
    exponential backoff, and logs again once it is back; meanwhile waits whose callback
    reached another replica finish by polling. A message on the channel that is not a
    relayed record (foreign, malformed, oversized) is counted and dropped: it can finish
    no wait and stops nothing. A record too large for ``max_message_size`` is not sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Generator
from types import TracebackType
from typing import Any, Final, Self

import attrs
import backoff

try:
    import redis.asyncio as aioredis
    from redis.asyncio.client import PubSub
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import RedisError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        'nanobanana_async.fleet needs the redis package: pip install "nanobanana-async[redis]"'
    ) from exc

from ._checks import check_count, check_number
from ._client import NanoBananaClient
from ._converter import DecodeFailure, converter, structure
from ._errors import ClientClosedError
from ._logs import FirstOfRun
from ._models import Task

__all__ = ["RedisRelay", "RelayDecodeError", "RelayStats", "decode_record", "encode_record"]

logger = logging.getLogger("nanobanana_async.fleet")

#: The channel every replica of one deployment publishes to and listens on by default.
DEFAULT_CHANNEL: Final = "nanobanana-async"

_VERSION: Final = 1  # of the message format below; a message of another version is foreign
_READ_WAKEUP: Final = 1.0  # seconds a read waits for a message before checking in again
_MIN_RECONNECT_WAIT: Final = 0.05
_PUBLISHING: Final = 32  # publishes at once, well within redis-py's pool of 100


# --------------------------------------------------------------------------- the codec
#
# A message is one JSON object: {"v": 1, "origin": <relay id>, "task": <Task record>}.
# The record is the converter's unstructured Task, read back through the same strict
# ``structure`` as any answer from the service, so a bad message is a decode error.


class RelayDecodeError(ValueError):
    """A message on the relay channel that is not a relayed task record."""


def encode_record(task: Task, *, origin: str, max_size: int) -> bytes | None:
    """One task record as a channel message, or None if it cannot fit in ``max_size``.

    The record goes without its ``request``: that echo of the submission holds the
    ``callback_url`` (with the receivers' shared secret in it) and may hold ``data:``
    URLs of megabytes, and a waiter needs the outcome, not the echo.
    """
    if task.request is not None:
        task = attrs.evolve(task, request=None)
    message = _dump(task, origin)
    return message if len(message) <= max_size else None


def _dump(task: Task, origin: str) -> bytes:
    body = {"v": _VERSION, "origin": origin, "task": converter.unstructure(task)}
    return json.dumps(body, separators=(",", ":")).encode()


def decode_record(data: bytes | str, *, max_size: int) -> tuple[str, Task]:
    """The sending relay's id and the task record of one channel message.

    Raises [`RelayDecodeError`][] for anything else: too large, not JSON, another
    format, or a record that does not decode.
    """
    if len(data) > max_size:
        raise RelayDecodeError(f"message of {len(data)} bytes is over {max_size}")
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):
        raise RelayDecodeError("message is not JSON") from None
    if not isinstance(payload, dict):
        raise RelayDecodeError(f"message is a JSON {type(payload).__name__}, not an object")
    version, origin = payload.get("v"), payload.get("origin")
    if type(version) is not int or version != _VERSION or not isinstance(origin, str):
        raise RelayDecodeError("message is not a relayed record (version or origin)")
    try:
        task = structure(payload.get("task"), Task, path="$.task")
    except DecodeFailure as failure:
        raise RelayDecodeError(f"unexpected record: {failure}") from None
    if not task.id.strip():
        raise RelayDecodeError("record has an empty id")
    return origin, task


# --------------------------------------------------------------------------- the relay


@attrs.define
class RelayStats:
    """Counters of what a relay did, for metrics and tests."""

    published: int = 0
    """Records sent to the other replicas."""
    unpublished: int = 0
    """Records not sent (Redis down, relay not started or closed, too large)."""
    received: int = 0
    """Records received from other replicas."""
    resolved: int = 0
    """Received records that finished a wait on this replica."""
    malformed: int = 0
    """Messages on the channel that were not relayed records: dropped."""
    disconnects: int = 0
    """Times an established connection to Redis was lost."""


class RedisRelay:
    """Relays confirmed callback records between the replicas of one service over Redis.

    ``client`` is this replica's client, ``redis_url`` any URL ``redis.asyncio`` accepts
    (``redis://``, ``rediss://``, ``unix://``; it may carry a password and is never
    logged). Pass the relay to this replica's
    [`CallbackReceiver`][nanobanana_async.webhooks.CallbackReceiver], which then needs an explicit
    ``secret`` shared by every replica. A replica without a receiver can still run a
    relay, to have its waits finished by callbacks other replicas receive.

    ``connect_timeout`` bounds connecting, subscribing and each publish. A subscription
    quiet for ``keepalive`` seconds is pinged: a connection cut without a reset (a NAT
    or load balancer's idle timeout, a host gone) would otherwise leave the relay
    "connected" and deaf; with no answer within ``connect_timeout`` it reconnects. A
    publish that fails stops publishing until the subscription answers a ping.
    """

    def __init__(
        self,
        client: NanoBananaClient,
        redis_url: str,
        *,
        channel: str = DEFAULT_CHANNEL,
        max_message_size: int = 256 * 1024,
        max_reconnect_wait: float = 5.0,
        connect_timeout: float = 5.0,
        keepalive: float = 5.0,
    ) -> None:
        if not isinstance(client, NanoBananaClient):
            raise TypeError("client must be a NanoBananaClient")
        if not isinstance(channel, str) or not channel:
            raise ValueError("channel must be a non-empty string")
        max_message_size = check_count("max_message_size", max_message_size, minimum=1024)
        max_reconnect_wait = check_number("max_reconnect_wait", max_reconnect_wait)
        connect_timeout = check_number("connect_timeout", connect_timeout)
        keepalive = check_number("keepalive", keepalive)
        self._client = client
        self._keepalive = keepalive
        self.channel = channel
        self.max_message_size = max_message_size
        self._max_reconnect_wait = max_reconnect_wait
        self._connect_timeout = connect_timeout
        # Parsed now, so a bad URL fails here; nothing connects until start().
        self._redis = aioredis.Redis.from_url(
            redis_url,
            socket_connect_timeout=connect_timeout,
            socket_timeout=connect_timeout,
            # Reconnecting is ours (with backoff, logging once); redis-py only gets one
            # immediate retry on a fresh connection, which mends a stale pooled one.
            retry=Retry(NoBackoff(), 1),
        )
        self._origin = secrets.token_hex(8)  # tells our own messages from the others'
        self._task: asyncio.Task[None] | None = None
        self._up = asyncio.Event()
        self._tried = asyncio.Event()  # the first connection attempt is over
        self._down_reported = False
        self._probe = False  # a publish failed: ping the subscription now
        self._publishing = asyncio.Semaphore(_PUBLISHING)
        self._refusals = FirstOfRun(logger)  # Redis refusing to publish, logged once
        self._malformed = FirstOfRun(logger)  # messages that are not records, logged once
        self._up_since = 0.0  # when the current subscription was confirmed
        self._connections = 0  # subscriptions made so far
        self._closed = False
        self.stats = RelayStats()

    def __repr__(self) -> str:
        if self._closed:
            state = "closed"
        elif self._up.is_set():
            state = "connected"
        else:
            state = "started" if self._task is not None else "not started"
        return f"<RedisRelay channel={self.channel!r} {state}>"

    @property
    def client(self) -> NanoBananaClient:
        """The client whose waiters this relay settles."""
        return self._client

    @property
    def connected(self) -> bool:
        """Whether the relay is subscribed to its channel right now."""
        return self._up.is_set()

    async def wait_connected(self) -> None:
        """Return once the relay is subscribed (e.g. for a readiness probe; add a timeout)."""
        await self._up.wait()

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Subscribe in the background; returns after the first connection attempt.

        An unreachable Redis does not fail the start (waits still finish by polling):
        it is logged once and retried in the background. Calling it again does nothing.
        """
        if self._closed:
            raise ClientClosedError("this RedisRelay is closed")
        if self._task is not None:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="nanobanana-async relay"
        )
        await self._tried.wait()

    async def aclose(self) -> None:
        """Stop listening and close the connections. Safe to call twice; never raises."""
        if self._closed:
            return
        self._closed = True
        self._up.clear()
        self._tried.set()  # a start() still waiting returns
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        try:
            await self._redis.aclose()
        except Exception as exc:  # closing a broken connection: nothing left to do
            logger.debug("closing the Redis connection failed: %s", type(exc).__name__)

    # --- publishing -------------------------------------------------------------------

    async def publish(self, task: Task) -> bool:
        """Send a record every replica should trust to the others; True if sent.

        A finished record settles their waiters on it; a pending one makes them poll the
        task eagerly. The callback receiver calls this; call it yourself only with a
        record you trust. Never raises: while Redis is down the record is skipped.
        """
        message = encode_record(task, origin=self._origin, max_size=self.max_message_size)
        if message is None:
            self.stats.unpublished += 1
            logger.debug("task %r's record is too large to relay", task.id)
            return False
        # At most _PUBLISHING at once: a burst of callbacks must not take more connections
        # than the pool has (redis-py refuses past its limit, which would read as an
        # outage). Whether the link is up is asked once a turn comes: a burst queued
        # behind a hung Redis is skipped at once when the first of it fails.
        async with self._publishing:
            if self._closed or not self._up.is_set():
                self.stats.unpublished += 1
                return False
            try:
                # Bounded: redis-py's one retry would otherwise double a hung Redis's wait.
                async with asyncio.timeout(self._connect_timeout):
                    await self._redis.publish(self.channel, message)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:  # TimeoutError
                self.stats.unpublished += 1
                # The link is in doubt: publish no more until the subscription answers.
                self._up.clear()
                self._probe = True
                self._report_down(exc)
                return False
            except RedisError as exc:
                # Redis answered, with a refusal (an ACL without PUBLISH, LOADING): the
                # link is fine, so nothing is reported down; logged once, then counted.
                self.stats.unpublished += 1
                self._refusals.log(
                    "Redis refused to publish on %r (%s: %s)",
                    self.channel,
                    type(exc).__name__,
                    exc,
                )
                return False
        self.stats.published += 1
        if self._down_reported:  # a failed publish had reported it down
            self._report_recovered()
        return True

    # --- listening --------------------------------------------------------------------

    async def _run(self) -> None:
        """Listen until closed: reconnect with capped exponential backoff after a failure."""
        delays = self._reconnect_delays()
        while True:
            connections = self._connections
            try:
                await self._listen()
            except (RedisError, OSError) as exc:
                self._lost(exc, self._connections > connections)
            except Exception as exc:  # a bug must not end the relay: retry like a failure
                logger.exception("the Redis relay failed")
                self._lost(exc, self._connections > connections)
            finally:
                self._tried.set()
            stayed = time.monotonic() - self._up_since >= self._max_reconnect_wait
            if self._connections > connections and stayed:
                # It had connected, and held: start the backoff over. A link dropped as
                # soon as it is made keeps backing off, so the loop never runs hot.
                delays = self._reconnect_delays()
            delay = max(_MIN_RECONNECT_WAIT, backoff.full_jitter(next(delays)))
            logger.debug("reconnecting to Redis in %.2f s", delay)
            await asyncio.sleep(delay)

    def _reconnect_delays(self) -> Generator[float, Any, None]:
        delays = backoff.expo(factor=_MIN_RECONNECT_WAIT * 2, max_value=self._max_reconnect_wait)
        next(delays)  # backoff's generators start with a bare yield
        return delays

    async def _listen(self) -> None:
        pubsub = self._redis.pubsub()
        try:
            async with asyncio.timeout(self._connect_timeout):
                await pubsub.subscribe(self.channel)
            await self._confirmed(pubsub)
            self._report_up()
            heard = time.monotonic()  # when Redis last said anything on this connection
            pinged: float | None = None  # when an unanswered ping went out
            self._probe = False
            while True:
                message = await pubsub.get_message(
                    ignore_subscribe_messages=True, timeout=_READ_WAKEUP
                )
                now = time.monotonic()
                if message is not None:
                    heard, pinged = now, None
                    if not self._up.is_set():  # a failed publish had suspected the link
                        self._report_up()
                    if message.get("type") == "message":
                        self._on_message(message.get("data"))
                    continue
                if pinged is not None:
                    if now - pinged > self._connect_timeout:
                        raise TimeoutError("Redis did not answer a ping: the link is dead")
                elif self._probe or now - heard >= self._keepalive:
                    self._probe = False
                    async with asyncio.timeout(self._connect_timeout):
                        await pubsub.ping()
                    pinged = now
        finally:
            self._up.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _confirmed(self, pubsub: PubSub) -> None:
        """Wait for the server's confirmation: messages published after it reach us."""
        deadline = time.monotonic() + self._connect_timeout
        while (left := deadline - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is not None and message.get("type") == "subscribe":
                return
        raise TimeoutError("Redis did not confirm the subscription")

    def _on_message(self, data: Any) -> None:
        """Hand one message to the client; a bad one is counted and dropped."""
        try:
            if not isinstance(data, bytes | str):
                raise RelayDecodeError(f"message data is a {type(data).__name__}")
            origin, task = decode_record(data, max_size=self.max_message_size)
        except Exception as exc:  # RelayDecodeError, or a decoder bug: neither stops us
            self.stats.malformed += 1
            # The first one is worth a warning; a flood of them must not flood the log.
            self._malformed.log(
                "dropped a message on %r that is not a relayed record: %s", self.channel, exc
            )
            return
        if origin == self._origin:
            return  # our own: the receiver already fed it to our client
        self.stats.received += 1
        try:
            if self._client._feed_relayed(task):
                self.stats.resolved += 1
                logger.debug("a relayed callback finished task %r", task.id)
        except Exception:
            logger.exception("feeding the relayed record of task %r failed", task.id)

    # --- reporting the connection's state, once per change ------------------------------

    def _lost(self, exc: BaseException, had_connected: bool) -> None:
        if had_connected:
            self.stats.disconnects += 1
        if self._down_reported:
            logger.debug("Redis is still unreachable: %s", exc)
        else:
            self._report_down(exc)

    def _report_down(self, exc: BaseException) -> None:
        if self._down_reported or self._closed:
            return
        self._down_reported = True
        logger.warning(
            "the Redis relay on %r is down (%s: %s): a callback now finishes waits only on "
            "the replica that receives it, the others finish by polling; reconnecting in "
            "the background",
            self.channel,
            type(exc).__name__,
            exc,
        )

    def _report_up(self) -> None:
        self._connections += 1
        self._up_since = time.monotonic()
        self._up.set()
        self._tried.set()
        self._report_recovered()

    def _report_recovered(self) -> None:
        if self._down_reported:
            self._down_reported = False
            logger.info("the Redis relay on %r is connected again", self.channel)
        else:
            logger.debug("the Redis relay on %r is connected", self.channel)
