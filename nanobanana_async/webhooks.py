"""Receive the service's ``callback_url`` deliveries: the fast path beside polling.

The service POSTs a finished task's result to the ``callback_url`` of its submission,
unsigned and at most once. [`CallbackReceiver`][] takes those deliveries, checks a
secret carried in the URL, answers at once, and then hands the body to
[`NanoBananaClient.feed_callback`][] in the background, which by default confirms the
task with one ``retrieve`` before it resolves any waiter. A wait on a task submitted
with a callback is still polled, lazily, so a lost delivery costs latency, not a hang.

With aiohttp::

    receiver = CallbackReceiver(client)
    receiver.add_route(app)  # POST /nanobanana/callback, closed on app shutdown
    url = receiver.callback_url("https://my.host.example/nanobanana/callback")
    submission = await client.generate("a cat", callback_url=url)
    urls = await client.await_completion(submission)

With any other framework (Starlette, FastAPI, Django, ...), read the body and the
``nb_secret`` query parameter and answer with the status [`CallbackReceiver.receive`][]
returns::

    body = await request.body()
    secret = request.query_params.get(SECRET_PARAM)
    return Response(status_code=await receiver.receive(body, secret=secret))

API
    ``CallbackReceiver(client, *, secret=None, verify=True, max_body_size=64 KiB,
    max_concurrency=32, max_pending=4096, relay=None)``; ``callback_url(public_url) -> str``;
    ``await receive(body, *, secret) -> int``; ``await handle(request) -> web.Response``
    (an aiohttp handler); ``add_route(app, path=DEFAULT_PATH)``; ``await drain()``;
    ``await aclose(timeout=5.0)``; ``stats`` (a [`ReceiverStats`][]); ``pending``.

Answers
    200 accepted (also for duplicates, late deliveries and tasks nobody waits on, which
    are then ignored), 400 malformed body, 401 wrong or missing secret (nothing else is
    looked at), 413 body over ``max_body_size``, 503 closed or overloaded (polling will
    pick the task up). The receiver never raises into the web framework.

Operating notes
    The secret is random per receiver unless you pass one; pass a stable one (from your
    configuration) if callbacks must survive a restart or reach another replica. A task
    whose callback reaches a process with no waiter for it is ignored there: the waiter
    elsewhere finishes by polling, unless the replicas share a
    [`RedisRelay`][nanobanana_async.fleet.RedisRelay] (``relay=``): then the receiving replica
    confirms every delivery, waited on here or not, and relays the record to the others
    (see ``nanobanana_async.fleet`` for the trust boundary). With ``verify``, a callback
    that arrives before its wait starts is ignored too (the wait then ends by polling;
    with a relay the confirmed record is kept briefly for it); without it, the record
    is kept briefly for that wait. The secret travels in the URL's query string, so keep
    query strings out of access logs (the ``examples/aiohttp_service.py`` access logger
    shows how); the receiver itself never logs or shows it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
import time
from typing import TYPE_CHECKING, Final

import attrs
from aiohttp import web
from yarl import URL

from . import _protocol
from ._checks import check_count
from ._client import NanoBananaClient
from ._errors import ClientClosedError, NanoBananaError, TaskNotFoundError
from ._logs import FirstOfRun
from ._models import Task

if TYPE_CHECKING:  # the relay needs the optional redis package
    from .fleet import RedisRelay

__all__ = ["DEFAULT_PATH", "SECRET_PARAM", "CallbackReceiver", "ReceiverStats"]

logger = logging.getLogger("nanobanana_async.webhooks")

#: The query parameter that carries the receiver's secret in a callback URL.
SECRET_PARAM: Final = "nb_secret"
#: Where [`CallbackReceiver.add_route`][] mounts the receiver by default.
DEFAULT_PATH: Final = "/nanobanana/callback"

_MIN_SECRET_LENGTH: Final = 16
_REASONS: Final = {
    200: "accepted",
    400: "malformed callback body",
    401: "wrong or missing secret",
    413: "callback body too large",
    500: "internal error",
    503: "not accepting callbacks now",
}


@attrs.define
class ReceiverStats:
    """Counters of what a receiver did with the deliveries it got, for metrics and tests."""

    accepted: int = 0
    """Answered 200 and handed to the client in the background (duplicates excluded)."""
    duplicates: int = 0
    """Answered 200 and dropped: the same task's delivery was still being handled."""
    resolved: int = 0
    """Finished a waited-on task (with ``verify``: the service's record, not the body)."""
    ignored: int = 0
    """Handled without effect: nobody waits, already finished, or not confirmed done."""
    failed: int = 0
    """Could not be confirmed (the ``retrieve`` failed): polling carries on."""
    relayed: int = 0
    """Records published to the other replicas through the relay."""
    unauthorized: int = 0
    """Answered 401."""
    malformed: int = 0
    """Answered 400."""
    too_large: int = 0
    """Answered 413."""
    rejected: int = 0
    """Answered 503: the receiver was closed or had ``max_pending`` deliveries queued."""


class CallbackReceiver:
    """Takes callback deliveries for one client and resolves its waiters with them.

    ``secret`` defaults to a fresh random one. With ``verify`` (the default) each
    delivery for a waited-on task costs one ``retrieve`` and only the service's own
    record resolves waiters; ``verify=False`` trusts the body (for a trusted network).
    At most ``max_concurrency`` deliveries are handled at once and ``max_pending``
    queued; beyond that deliveries get 503 and their tasks finish by polling.

    With a ``relay`` (several replicas behind one URL), every delivery is confirmed
    (one ``retrieve`` with ``verify``), settles this replica's waiters and is published
    to the others. The secret must then be passed, the same on every replica: a
    callback URL made by one replica is delivered to any of them.
    """

    def __init__(
        self,
        client: NanoBananaClient,
        *,
        secret: str | None = None,
        verify: bool = True,
        max_body_size: int = 64 * 1024,
        max_concurrency: int = 32,
        max_pending: int = 4096,
        relay: RedisRelay | None = None,
    ) -> None:
        if relay is not None:
            if secret is None:
                raise ValueError(
                    "a receiver with a relay needs an explicit secret, the same on every "
                    "replica: a random one would refuse the other replicas' callback URLs"
                )
            if relay.client is not client:
                raise ValueError("the relay must be built on the receiver's client")
        if secret is None:
            secret = secrets.token_urlsafe(32)
        elif not isinstance(secret, str) or len(secret.strip()) < _MIN_SECRET_LENGTH:
            # Never echo the value: it is the secret, even when it is a bad one.
            raise ValueError(f"secret must be a string of at least {_MIN_SECRET_LENGTH} characters")
        max_body_size = check_count("max_body_size", max_body_size)
        max_concurrency = check_count("max_concurrency", max_concurrency)
        max_pending = check_count("max_pending", max_pending)
        self._client = client
        self._secret = secret
        self._secret_bytes = secret.encode()
        self.verify = verify
        self.max_body_size = max_body_size
        self.max_pending = max_pending
        self._limit = asyncio.Semaphore(max_concurrency)
        self._active: dict[str, asyncio.Task[None]] = {}
        self._relay = relay
        self._closed = False
        # Each logged once per run, then counted in stats: wrong secrets (until a right
        # one), overloads (until half drained), failed confirmations (until one works).
        self._refusals = FirstOfRun(logger, logging.INFO)
        self._overload = FirstOfRun(logger)
        self._failures = FirstOfRun(logger)
        self.stats = ReceiverStats()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return (
            f"<CallbackReceiver verify={self.verify} secret=*** "
            f"pending={len(self._active)} {state}>"
        )

    @property
    def pending(self) -> int:
        """How many accepted deliveries are still being handled."""
        return len(self._active)

    @property
    def closed(self) -> bool:
        """Whether [`aclose`][] was called; a closed receiver answers 503."""
        return self._closed

    # --- building callback URLs ----------------------------------------------------

    def callback_url(self, public_url: str) -> str:
        """``public_url`` (where the service can reach the receiver) with the secret added.

        Any query the URL already has is kept. Pass the result as ``callback_url`` to
        ``generate``/``edit``.
        """
        url = URL(public_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError("public_url must be an absolute http(s) URL")
        return str(url.update_query({SECRET_PARAM: self._secret}))

    def _secret_ok(self, given: str | None) -> bool:
        if given is None:
            return False
        # Compared as bytes: compare_digest refuses non-ASCII str, and a forger picks
        # whatever characters they like.
        return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), self._secret_bytes)

    # --- receiving --------------------------------------------------------------------

    async def receive(self, body: bytes | str, *, secret: str | None) -> int:
        """Take one delivery from any web framework; returns the HTTP status to answer.

        ``secret`` is the value of the URL's ``nb_secret`` query parameter (None when
        absent). Answers at once: confirming and resolving happen in the background.
        Never raises.
        """
        try:
            if self._closed:
                self.stats.rejected += 1
                return 503
            if not self._secret_ok(secret):
                return self._unauthorized()
            size = len(body.encode() if isinstance(body, str) else body)
            if size > self.max_body_size:
                self.stats.too_large += 1
                return 413
            return self._accept(body)
        except Exception:
            logger.exception("the callback receiver failed on a delivery")
            return 500

    async def handle(self, request: web.Request) -> web.Response:
        """An aiohttp handler for callback deliveries: ``app.router.add_post(path, r.handle)``.

        Checks the secret before reading anything, and reads at most ``max_body_size``
        bytes of the body. Never raises.
        """
        try:
            status = await self._handle(request)
        except Exception:
            logger.exception("the callback receiver failed on a delivery")
            status = 500
        return web.Response(status=status, text=_REASONS.get(status, ""))

    async def _handle(self, request: web.Request) -> int:
        if self._closed:
            self.stats.rejected += 1
            return 503
        if not self._secret_ok(request.query.get(SECRET_PARAM)):
            return self._unauthorized()
        length = request.content_length
        if length is not None and length > self.max_body_size:
            self.stats.too_large += 1
            return 413
        chunks: list[bytes] = []
        size = 0
        try:
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self.max_body_size:
                    self.stats.too_large += 1
                    return 413
                chunks.append(chunk)
        except Exception as exc:  # a broken or aborted upload: nobody is left to answer
            logger.debug("callback body could not be read: %s", type(exc).__name__)
            self.stats.malformed += 1
            return 400
        return self._accept(b"".join(chunks))

    def add_route(self, app: web.Application, path: str = DEFAULT_PATH) -> web.AbstractRoute:
        """Mount [`handle`][] at ``POST path`` and close the receiver on app shutdown."""
        route = app.router.add_post(path, self.handle)
        app.on_shutdown.append(self._on_app_shutdown)
        return route

    async def _on_app_shutdown(self, app: web.Application) -> None:
        await self.aclose()

    def _unauthorized(self) -> int:
        self.stats.unauthorized += 1
        # Anyone can send these: the first of a run is worth a line (a replica with
        # another secret shows up so), the rest are counted. A delivery with the right
        # secret ends the run.
        self._refusals.log("a callback with a wrong or missing secret was refused (401)")
        return 401

    def _accept(self, body: bytes | str) -> int:
        """Parse and check the body now, handle it later; the status to answer."""
        self._refusals.end()  # the secret was right: a later wrong one is news again
        if self._closed:
            self.stats.rejected += 1
            return 503
        try:
            # With verify, the body is only a hint: its id is all that is kept (the
            # record comes from retrieve), so a large forged body costs no structuring
            # and no memory while it waits for a slot.
            claim = _protocol.task_from_callback(
                body, received_at=time.time(), id_only=self.verify
            )
        except (RecursionError, NanoBananaError) as exc:
            self.stats.malformed += 1
            logger.debug("malformed callback body refused: %s", type(exc).__name__)
            return 400
        task_id = claim.id
        if task_id in self._active:
            self.stats.duplicates += 1
            return 200
        if len(self._active) >= self.max_pending:
            self.stats.rejected += 1
            # Once per overload, not once per refused delivery (a flood would flood the log).
            self._overload.log(
                "%d callbacks already queued: refusing more (503) until half are "
                "handled; polling will finish their tasks",
                len(self._active),
            )
            return 503
        task = asyncio.get_running_loop().create_task(
            self._resolve(claim), name=f"nanobanana-async callback {task_id}"
        )
        self._active[task_id] = task
        task.add_done_callback(lambda done: self._forget(task_id, done))
        self.stats.accepted += 1
        return 200

    def _forget(self, task_id: str, task: asyncio.Task[None]) -> None:
        if self._active.get(task_id) is task:
            del self._active[task_id]
        if self._overload.running and len(self._active) <= self.max_pending // 2:
            self._overload.end()

    async def _resolve(self, claim: Task) -> None:
        """Hand one accepted body to the client; every outcome is counted, none raised."""
        task_id = claim.id
        to_relay: Task | None = None
        try:
            async with self._limit:
                # Parsed once, in _accept: hand the claim on rather than the body.
                relay = self._relay
                if relay is not None and relay.connected:
                    result, to_relay = await self._relay_claim(claim)
                else:  # alone, or Redis is down: nobody else would hear of it
                    result = await self._client._feed_claim(claim, verify=self.verify)
        except ClientClosedError:
            self.stats.ignored += 1
        except NanoBananaError as exc:
            self.stats.failed += 1
            # Once per run of failures (the service down fails every delivery alike).
            self._failures.log(
                "could not confirm the callback for task %r, polling carries on: %s",
                task_id,
                exc,
            )
        except Exception:
            self.stats.failed += 1
            logger.exception("handling the callback for task %r failed", task_id)
        else:
            self._failures.end()
            if result is None:
                self.stats.ignored += 1
            else:
                self.stats.resolved += 1
                logger.debug("callback finished task %r", task_id)
        # Published outside the slot: a slow Redis must not hold up deliveries whose
        # waiters are here (publish is bounded by the relay's connect_timeout).
        if to_relay is not None and self._relay is not None and await self._relay.publish(to_relay):
            self.stats.relayed += 1

    async def _relay_claim(self, claim: Task) -> tuple[Task | None, Task | None]:
        """Confirm a delivery whoever waits on it and settle waiters here; returns the
        record that finished a wait here (or None) and the record to relay (or None).

        Only this replica reads the task: the others trust the relayed record.
        """
        record = claim
        if self.verify:
            try:
                record = await self._client.retrieve(claim.id)
            except TaskNotFoundError:
                return None, None  # forged, or another account's id: nothing to relay
        resolved = self._client._feed_relayed(record)
        return (record if resolved else None), record

    # --- lifecycle --------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until every delivery accepted so far has been handled."""
        while self._active:
            await asyncio.wait(list(self._active.values()))

    async def aclose(self, timeout: float = 5.0) -> None:
        """Refuse new deliveries (503), give those in hand ``timeout`` s, cancel the rest.

        Call it before closing the client. Safe to call twice; never raises.
        """
        self._closed = True
        pending = list(self._active.values())
        if not pending:
            return
        _, late = await asyncio.wait(pending, timeout=timeout)
        for task in late:
            task.cancel()
        if late:
            await asyncio.wait(late)
