"""``NanoBananaClient``: ties the protocol, the transport, retries and the poller together."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import TracebackType
from typing import Any, Final, TypeVar, cast

import aiohttp
from yarl import URL

from . import _addresses, _download, _images, _protocol, _transport
from ._checks import check_count, check_number, check_timeout
from ._concurrency import InFlight, gather_or_cancel
from ._errors import (
    ClientClosedError,
    NanoBananaError,
    TaskFailedError,
    TaskNotFoundError,
)
from ._models import Submission, Task, TaskBatch, TaskState
from ._poller import OnUpdate, Poller, Target
from ._retry import (
    RetryPolicy,
    is_retryable_read,
    is_retryable_submission,
    may_have_created_task,
    retrying,
)
from ._version import __version__

__all__ = ["BASE_URL_ENV", "DEFAULT_BASE_URL", "TOKEN_ENV", "NanoBananaClient", "TaskRef"]

logger = logging.getLogger("nanobanana_async")

DEFAULT_BASE_URL: Final = "https://api.acedata.cloud"
TOKEN_ENV: Final = "ACEDATACLOUD_API_TOKEN"
BASE_URL_ENV: Final = "ACEDATACLOUD_API_BASE_URL"

#: The largest API answer read by default, after any gzip inflation (bytes).
DEFAULT_MAX_RESPONSE_BYTES: Final = 32 * 1024 * 1024

#: What the waiting methods accept: a task id, the Submission that made it, or a record.
TaskRef = str | Submission | Task

T = TypeVar("T")
# A retrying wrapper of NanoBananaClient._exchange: (path, body, read) -> what read returns.
_Exchange = Callable[[str, dict[str, Any], Callable[[_protocol.RawResponse], Any]], Awaitable[Any]]


class NanoBananaClient:
    """An asyncio client for the Nano Banana API; one per event loop, closed when done.

    Use it as ``async with NanoBananaClient() as client:`` or call [`aclose`][]. It
    creates its aiohttp session on first use inside the running loop, or borrows
    ``session``, which it then never closes. Its own session keeps no cookies (so an
    image host's cookie never reaches the API) and never connects to a link-local
    address that a DNS name points at. A borrowed session's own default headers and
    cookie jar serve every request it makes, image downloads included: do not give it
    one that carries credentials, and give it ``aiohttp.DummyCookieJar()``.
    """

    def __init__(
        self,
        token: str | None = None,
        *,
        base_url: str | None = None,
        session: aiohttp.ClientSession | None = None,
        timeout: float = 30.0,
        max_retries: int | None = None,
        batch_size: int = 50,
        poll_interval: float = 1.0,
        max_poll_interval: float = 1.5,
        max_requests_per_second: int = 20,
        not_found_grace: float = 30.0,
        callback_poll_interval: float = 15.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        retry: RetryPolicy | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not isinstance(token, str) or not token.strip():
            raise NanoBananaError(
                f"no API token: pass one, or set the {TOKEN_ENV} environment variable"
            )
        base = base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL
        url = URL(base)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"base_url must be an http(s) URL, got {base!r}")
        timeout = check_number("timeout", timeout)
        batch_size = check_count("batch_size", batch_size, maximum=1000)
        poll_interval = check_number("poll_interval", poll_interval)
        max_poll_interval = check_number("max_poll_interval", max_poll_interval)
        if poll_interval > max_poll_interval:
            raise ValueError(
                "poll_interval must be at most max_poll_interval, "
                f"got {poll_interval!r} and {max_poll_interval!r}"
            )
        not_found_grace = check_number("not_found_grace", not_found_grace, strict=False)
        callback_poll_interval = check_number("callback_poll_interval", callback_poll_interval)
        max_requests_per_second = check_count(
            "max_requests_per_second", max_requests_per_second, maximum=10_000
        )
        self._max_response_bytes = check_count(
            "max_response_bytes", max_response_bytes, minimum=1024
        )
        if retry is None:
            retries = 3 if max_retries is None else max_retries
            retry = RetryPolicy(max_retries=check_count("max_retries", retries, minimum=0))
        elif max_retries is not None:
            raise ValueError("pass max_retries or retry=RetryPolicy(...), not both")

        self._base_url = str(url).rstrip("/")
        # Kept in an object whose repr hides it: tracebacks rendered with locals show ***.
        self._credentials: Final = _transport.Credentials(
            token.strip(), f"nanobanana-async/{__version__}"
        )
        self._endpoints: dict[str, URL] = {}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 10.0))
        self._session = session
        self._owns_session = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._batch_size = batch_size
        self._retry = retry
        self._read: _Exchange = retrying(self._exchange, retry, is_retryable_read)
        self._submit: _Exchange = retrying(self._exchange, retry, is_retryable_submission)
        self._downloads = InFlight("download")
        self._calls = InFlight("request")  # API calls: aclose stops them at once
        self._poller = Poller(
            self._fetch_for_poller,
            batch_size=batch_size,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            not_found_grace=not_found_grace,
            lazy_poll_interval=max(callback_poll_interval, max_poll_interval),
            retry=retry,
            max_requests_per_second=max_requests_per_second,
        )

    def __repr__(self) -> str:
        # Hand-checked: the token never appears, not even in part.
        state = "closed" if self._closed else "open"
        return f"<NanoBananaClient base_url={self._base_url!r} token=*** {state}>"

    @property
    def base_url(self) -> str:
        """The API's base URL, without a trailing slash."""
        return self._base_url

    @property
    def batch_size(self) -> int:
        """Task ids per ``retrieve_batch`` request."""
        return self._batch_size

    @property
    def retry_policy(self) -> RetryPolicy:
        """How failed requests are retried (fixed at construction)."""
        return self._retry

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> NanoBananaClient:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the poll loop, fail waits still in progress, close an owned session."""
        if self._closed and self._session is None:
            return
        self._closed = True
        try:
            await self._poller.aclose()
            # Before the session: aiohttp leaves a body read hanging when its session
            # closes under it.
            await self._downloads.aclose()
            await self._calls.aclose()
        finally:
            # Even when this close is itself cancelled (a TaskGroup, a second Ctrl-C):
            # an owned session is closed, or a later aclose() closes it.
            session = self._session
            if session is not None and self._owns_session:
                await asyncio.shield(session.close())
            self._session = None

    def _check_open(self) -> None:
        if self._closed:
            raise ClientClosedError("this NanoBananaClient is closed")

    def _get_session(self) -> aiohttp.ClientSession:
        self._check_open()
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            # A session and its futures belong to one loop; silently making a second
            # would leak the first. One client per event loop.
            raise NanoBananaError(
                "this NanoBananaClient was first used in another event loop; "
                "create one client per event loop (e.g. per asyncio.run call)"
            )
        if self._session is None:
            self._session = aiohttp.ClientSession(
                cookie_jar=aiohttp.DummyCookieJar(), connector=_addresses.guarded_connector()
            )
        return self._session

    # --- the request primitive --------------------------------------------------------

    def _endpoint(self, path: str) -> URL:
        # Parsed once per path: aiohttp would parse a URL string on every request.
        url = self._endpoints.get(path)
        if url is None:
            url = self._endpoints[path] = URL(self._base_url + path)
        return url

    async def _exchange(
        self, path: str, body: dict[str, Any], read: Callable[[_protocol.RawResponse], Any]
    ) -> Any:
        """One attempt: send, then judge the answer's status and body with ``read``.

        ``read`` is a ``_protocol.parse_*`` function (no I/O). It runs inside the attempt,
        so the retry wrappers see an error the same way whether it came as a status or
        in a 200 body. The poll loop calls this once per request: it owns its retries.
        """
        response = await _transport.post(
            self._get_session(),
            self._endpoint(path),
            json.dumps(body).encode(),
            credentials=self._credentials,
            timeout=self._timeout,
            max_size=self._max_response_bytes,
        )
        if logger.isEnabledFor(logging.DEBUG):  # reading the trace id costs a parse
            logger.debug(
                "POST %s %s -> %d trace_id=%s",
                path,
                body.get("action"),
                response.status,
                _protocol.trace_id_of(response),
            )
        return read(response)

    async def _call(
        self,
        attempts: _Exchange,
        path: str,
        body: dict[str, Any],
        read: Callable[[_protocol.RawResponse], T],
    ) -> T:
        """Run ``attempts`` (a retrying wrapper of :meth:`_exchange`) with a typed result,
        as a call ``aclose`` stops at once (ClientClosedError)."""
        return cast(T, await self._calls.run(attempts(path, body, read)))

    # --- submitting -------------------------------------------------------------------

    async def generate(
        self,
        prompt: str,
        *,
        model: str | None = None,
        aspect_ratio: str | None = None,
        resolution: str | None = None,
        count: int | None = None,
        callback_url: str | None = None,
    ) -> Submission:
        """Submit an image generation; returns at once with the task to wait on."""
        body = _protocol.build_submission(
            "generate",
            prompt,
            model=model,
            aspect_ratio=aspect_ratio,
            resolution=resolution,
            count=count,
            callback_url=callback_url,
        )
        return await self._submit_body(body, callback_url)

    async def edit(
        self,
        prompt: str,
        image_urls: Sequence[str | os.PathLike[str] | bytes],
        *,
        model: str | None = None,
        aspect_ratio: str | None = None,
        resolution: str | None = None,
        count: int | None = None,
        callback_url: str | None = None,
    ) -> Submission:
        """Submit an edit of ``image_urls``; returns at once.

        Each image is an http(s) or ``data:`` URL, sent as it is, or a file path or the
        image's bytes, sent as a ``data:`` URL (files are read off the event loop). Every
        entry is checked against the API's 10 MB limit before any request.
        """
        body = _protocol.build_submission(
            "edit",
            prompt,
            image_urls=await _images.image_urls(image_urls),
            model=model,
            aspect_ratio=aspect_ratio,
            resolution=resolution,
            count=count,
            callback_url=callback_url,
        )
        return await self._submit_body(body, callback_url)

    async def _submit_body(self, body: dict[str, Any], callback_url: str | None) -> Submission:
        read = functools.partial(_protocol.parse_submission, callback_url=callback_url)
        self._check_open()  # closed before: nothing was sent
        try:
            submission = await self._call(self._submit, _protocol.IMAGES_PATH, body, read)
        except NanoBananaError as exc:
            if may_have_created_task(exc):
                exc.add_note(
                    "The submission may have reached the service and created a task; "
                    "it was not retried, to avoid paying twice."
                )
            raise
        logger.debug(
            "submitted %s: task_id=%s trace_id=%s",
            body["action"],
            submission.task_id,
            submission.trace_id,
        )
        return submission

    # --- reading ----------------------------------------------------------------------

    async def retrieve(self, task_id: str) -> Task:
        """Read one task record; an id the service does not know raises TaskNotFoundError."""
        body = _protocol.build_retrieve(task_id)
        read = functools.partial(_protocol.parse_task, task_id=task_id)
        return await self._call(self._read, _protocol.TASKS_PATH, body, read)

    async def retrieve_batch(self, task_ids: Iterable[str]) -> TaskBatch:
        """Read many records, ``batch_size`` ids per request; unknown ids are absent."""
        ids = _protocol.check_task_ids(task_ids)
        size = self._batch_size
        chunks = [ids[i : i + size] for i in range(0, len(ids), size)]
        batches = await gather_or_cancel(self._retrieve_chunk(chunk) for chunk in chunks)
        items = [task for batch in batches for task in batch.items]
        return TaskBatch(items=items, count=len(items))

    async def _retrieve_chunk(self, ids: list[str]) -> TaskBatch:
        read = functools.partial(_protocol.parse_task_batch, task_ids=ids)
        body = _protocol.build_retrieve_batch(ids)
        return await self._call(self._read, _protocol.TASKS_PATH, body, read)

    async def _fetch_for_poller(self, ids: list[str]) -> dict[str, Any]:
        # One attempt, no retry wrapper: the poll loop owns its retries (and its pauses).
        body = _protocol.build_retrieve_batch(ids)
        records: dict[str, Any] = await self._exchange(
            _protocol.TASKS_PATH, body, _protocol.batch_items
        )
        return records

    # --- callbacks --------------------------------------------------------------------

    async def feed_callback(
        self, body: bytes | str | Mapping[str, Any], *, verify: bool = True
    ) -> Task | None:
        """Hand a ``callback_url`` delivery to the waiters; the fast path beside polling.

        With ``verify`` (the default) the task is confirmed with one ``retrieve`` first,
        so a forged body can never inject image URLs; a task nobody waits on is then
        left alone. Returns the finished record that resolved waiters, else None.
        Check the sender (e.g. a secret in the callback URL) before calling this;
        ``nanobanana_async.webhooks`` does it for you.
        """
        claimed = _protocol.task_from_callback(
            dict(body) if isinstance(body, Mapping) else body, received_at=time.time()
        )
        return await self._feed_claim(claimed, verify=verify)

    async def _feed_claim(self, claimed: Task, *, verify: bool) -> Task | None:
        """feed_callback for a body already parsed (the webhook receiver parses it first)."""
        if not verify:
            return claimed if self._poller.feed(claimed, remember=True) else None
        if not self._poller.watching(claimed.id):
            self._poller.expedite(claimed.id)  # a wait starting soon polls eagerly
            return None
        try:
            confirmed = await self.retrieve(claimed.id)
        except TaskNotFoundError:
            return None
        if not confirmed.done:
            # Premature (the record lags the callback) or forged: poll it eagerly.
            self._poller.expedite(claimed.id)
            return None
        return confirmed if self._poller.feed(confirmed) else None

    def _feed_relayed(self, task: Task) -> bool:
        """A record another replica's callback receiver vouched for (``fleet.RedisRelay``).

        Trusted, so nothing is read: a finished record settles the waits on it here (or
        is kept briefly for a wait about to start); a pending one (the service's record
        lagged the callback) makes the task poll eagerly. True if it finished a wait.
        """
        if self._closed:
            return False
        if not task.done:
            self._poller.expedite(task.id)
            return False
        return self._poller.feed(task, remember=True)

    # --- downloads --------------------------------------------------------------------

    async def download(
        self,
        url: str,
        dest: str | os.PathLike[str],
        *,
        max_bytes: int = _download.DEFAULT_MAX_BYTES,
        stem: str | None = None,
    ) -> Path:
        """Stream one image to ``dest`` (a file, or a folder to name it in); returns its path.

        Written atomically (nothing half-written is ever left), retried on transient
        failures, and sent without our Authorization header: images live on other hosts.
        Each attempt must finish within the client's ``timeout``, and the image must be
        at most ``max_bytes`` (64 MiB by default) of real PNG, JPEG, WebP, GIF, AVIF or
        HEIC/HEIF bytes; ``aclose`` stops it with ClientClosedError. With ``stem``, ``dest``
        is a folder and the file is ``stem`` plus the extension of what the bytes are.
        """
        session = self._get_session()
        return await self._downloads.run(
            _download.download(
                session,
                url,
                dest,
                policy=self._retry,
                timeout=self._timeout,
                max_bytes=max_bytes,
                stem=stem,
            )
        )

    async def download_all(
        self,
        task_or_urls: Task | Iterable[str],
        folder: str | os.PathLike[str],
        *,
        concurrency: int = 8,
        max_bytes: int = _download.DEFAULT_MAX_BYTES,
    ) -> list[Path]:
        """Download every image of a finished task (or every URL given) into ``folder``.

        Each image as [`download`][] does, at most ``concurrency`` at once.
        """
        if isinstance(task_or_urls, Task):
            if task_or_urls.state is not TaskState.SUCCEEDED:
                raise ValueError(f"task {task_or_urls.id!r} has no images to download")
            urls = task_or_urls.image_urls
        elif isinstance(task_or_urls, str):
            raise ValueError("task_or_urls must be a Task or a list of URLs, not one string")
        else:
            urls = list(task_or_urls)
        session = self._get_session()
        return await self._downloads.run(
            _download.download_all(
                session,
                urls,
                folder,
                concurrency=concurrency,
                policy=self._retry,
                timeout=self._timeout,
                max_bytes=max_bytes,
            )
        )

    # --- waiting ----------------------------------------------------------------------

    def wait(
        self,
        task: TaskRef,
        *,
        timeout: float | None = 600.0,
        on_update: OnUpdate | None = None,
    ) -> Coroutine[Any, Any, Task]:
        """Wait until the task has finished; returns its record, succeeded or failed.

        Raises TaskTimeoutError after ``timeout`` seconds (None: no deadline), with the
        last record seen. ``on_update`` (a function or coroutine function) is called
        with the record each time it changes, at least once with the finished one.
        Returns the poll loop's own coroutine: one frame per waiter, no wrappers.
        """
        return self._poller.wait(
            _target(task),
            _itself,
            timeout=check_timeout("timeout", timeout),
            on_update=on_update,
            check=self._get_session,  # closed, or in another event loop: fail fast
        )

    def await_completion(
        self,
        task: TaskRef,
        *,
        timeout: float | None = 600.0,
        on_update: OnUpdate | None = None,
    ) -> Coroutine[Any, Any, list[str]]:
        """Wait for the task and return its image URLs; raises TaskFailedError if it failed."""
        return self._poller.wait(
            _target(task),
            _image_urls,
            timeout=check_timeout("timeout", timeout),
            on_update=on_update,
            check=self._get_session,
        )

    def as_completed(
        self, tasks: Iterable[TaskRef], *, timeout: float | None = None
    ) -> AsyncGenerator[Task, None]:
        """Yield each task's finished record once, as they finish (failed ones too).

        A task whose record cannot be had (an unknown id, a refused one) does not end
        the loop for the others: its error is raised once they are all yielded, with
        notes naming the other tasks that failed. After ``timeout`` seconds in all,
        raises TaskTimeoutError for a task still pending and stops waiting on the rest.
        Leaving the loop early ends the waits (at once with ``contextlib.aclosing``,
        else when the iterator is collected).
        """
        targets = [_target(task) for task in tasks]
        timeout = check_timeout("timeout", timeout)
        self._get_session()
        return self._poller.as_completed(targets, timeout=timeout)


def _itself(task: Task) -> Task:
    return task


def _image_urls(task: Task) -> list[str]:
    """A finished task's image URLs; TaskFailedError if it failed."""
    if task.failure is not None:
        raise TaskFailedError(task)
    return task.image_urls


def _target(task: TaskRef) -> Target:
    """What the poller needs to know of anything naming a task."""
    if isinstance(task, Submission):
        # Just submitted: its first poll waits for it to have a chance; a callback will
        # announce it, if it has one: poll it lazily.
        return Target(
            _protocol.check_task_id(task.task_id),
            lazy=task.callback_url is not None,
            fresh=True,
        )
    if isinstance(task, Task):
        return Target(_protocol.check_task_id(task.id), known=task)
    return Target(_protocol.check_task_id(task))
