"""A fake Nano Banana server for tests, benchmarks and demos.

[`FakeNanoBanana`][] is a real ``aiohttp.web`` server on 127.0.0.1 that speaks the
AceData Cloud Nano Banana wire protocol (``POST /nano-banana/images`` and
``POST /nano-banana/tasks``), plus a second listener that hosts the generated images on a
different host name *and* port, so a client can tell the API from the image CDN.  It is cheap
enough for benchmarks with thousands of tasks: a task's state is computed from timestamps when
it is read, and the only per-task timers are those that deliver callbacks.

Basic use::

    from nanobanana_async.testing import FakeNanoBanana

    async with FakeNanoBanana(duration=0.1) as server:
        # point a client at server.base_url with token server.token
        task_id = server.add_task(outcome="fail")   # or submit over HTTP
        server.finish(task_id)                      # finish it now

Constructor (all keyword-only)
    ``token`` (bearer token the API accepts, default ``"test-token"``), ``duration`` (seconds
    from submission to finish; a ``(lo, hi)`` tuple draws uniformly from the seeded RNG),
    ``fail_rate`` (fraction of HTTP submissions that fail; failing tasks rotate through the
    three failure shapes), ``pending_shape`` (``"ack"``: a pending record carries
    ``response={"success": true, "task_id", "trace_id"}`` with no ``data``; ``"none"``: no
    ``response`` key; ``"mixed"``: alternate per task, starting with ``"ack"``), ``seed`` (seeds
    durations, failures and ids; ``None`` for a random seed), ``host``/``port`` (API listener,
    port 0 = OS-chosen), ``image_host`` (host name written into image URLs, default
    ``"localhost"``) and ``image_port`` (image listener port, default 0).

Lifecycle
    ``await server.start()`` / ``await server.close()`` or ``async with``.  ``close()`` answers
    requests still held (synchronous submissions, ``"slow"`` faults) with a 503, stops both
    listeners, cancels pending callback deliveries and closes the callback HTTP session.
    ``server.base_url`` (``http://127.0.0.1:<port>``), ``server.image_base_url``
    (``http://localhost:<port2>``) and ``server.token`` describe where to point a client.

Outcome of HTTP submissions
    A prompt containing ``[fail:top]`` fails with a top-level ``error`` (shape b),
    ``[fail:empty]`` finishes with no images (shape c), and ``[fail]`` fails with
    ``response.success == false`` and code ``forbidden`` (shape a).  Other prompts fail with
    probability ``fail_rate`` (shapes a, b, c in rotation) and otherwise succeed with ``count``
    images, each ``{"prompt", "image_url": image_base_url + "/img/<task_id>/<i>.png"}``.

Failure shapes in task records
    * ``"fail"`` (a): finished, ``response = {"success": false, "task_id", "trace_id",
      "error": {"code": "forbidden", "message": ...}}``.
    * ``"fail_top_level"`` (b): a top-level ``error`` object and no ``response``,
      ``started_at``, ``finished_at`` or ``elapsed``: the error is the only failure signal.
    * ``"fail_no_images"`` (c): finished, ``response = {"success": true, "task_id",
      "trace_id", "data": []}``.

    A synchronous submission (no ``async: true`` and no ``callback_url``) is held until the task
    finishes and answered with the result body: 200 with ``data`` on success, 403 (shape a) or
    500 (shape b) with ``{"success": false, "task_id", "trace_id", "error"}``, 200 with an empty
    ``data`` (shape c).  Callback bodies are the same result body.

Direct control (no HTTP)
    ``add_task(*, duration=None, outcome="succeed", count=1, prompt="a test image",
    callback_url=None, task_id=None, error_code=None, error_message=None) -> str`` creates a
    task (the server must be running; prompt markers and ``fail_rate`` do not apply, its
    ``request`` is a synthetic ``{"action": "generate", "prompt", "async": true, ...}``);
    ``finish(task_id)`` finishes it now; ``tasks`` maps ids to [`FakeTask`][] objects, which
    expose ``id``, ``outcome``, ``count``, ``prompt``, ``request``, ``callback_url``,
    ``trace_id``, ``created_at``, ``finishes_at`` (``time.monotonic()`` of the finish, for
    latency measurements), ``finishes_at_wall`` (``time.time()``), ``duration``,
    ``finished``, ``image_urls``, ``error``, ``result()`` (the sync/callback body) and
    ``record()`` (the wire record).

Fault injection (API listener)
    ``inject(kind, *, times=1, action=None, status=None, code=None, retry_after=None,
    delay=0.0, message=None, body=None, size=1 << 30, task_id=None)`` queues a fault;
    queued faults are consumed in FIFO order by the next API requests whose body
    ``action`` matches (``action=None`` matches any).
    Kinds: ``"error"`` (JSON error, default 500 ``api_error`` "fetch failed"; a ``code`` alone
    picks its usual status and a ``status`` alone its usual code), ``"html"`` (nginx-style HTML
    page, default 502), ``"rate_limit"`` (429 ``too_many_requests`` with ``Retry-After``,
    default ``"1"``), ``"not_json"`` (status 200, ``body`` default ``<html>oops</html>``; a body
    starting with ``{`` or ``[`` is labelled ``application/json``), ``"drop"`` (the connection is
    closed with no answer), ``"slow"`` (wait ``delay`` seconds, then answer normally) and
    ``"gzip_bomb"`` (status 200 or ``status``, ``Content-Encoding: gzip``, chunked, inflating to
    ``size`` bytes of JSON whitespace, default 1 GiB, from about ``size / 1000`` bytes on the
    wire; streamed, so the server's memory stays small).  ``retry_after`` adds a
    ``Retry-After`` header to ``"error"`` and ``"rate_limit"`` answers, verbatim when it is a
    string (``"0"``, ``"-5"``, an HTTP date in the past).  A faulted submission creates no
    task, except ``"slow"``.  With ``task_id``, a fault applies only to requests that name
    that task (``retrieve``'s ``id``, or one of ``retrieve_batch``'s ``ids``), so a test can
    make the service refuse, or hang on, the batches that hold one id.  ``clear_faults()``
    empties the queue.

Image listener
    ``GET /img/<task_id>/<i>.png`` serves a 16x16 solid-colour PNG for a finished, successful
    task, else 404.  ``image_requests`` records ``(path, headers)`` of every request.
    ``inject_image(kind, *, times=1, delay=1.0, location=None)`` queues a fault for the next
    ``times`` image requests, consumed in FIFO order, with kinds ``"html"`` (200
    ``text/html``), ``"truncate"`` (full ``Content-Length``, half the body, then the
    connection closes), ``"error"`` (500), ``"slow"`` (wait ``delay`` seconds, then answer
    normally), ``"drip"`` (the PNG with its full ``Content-Length``, one byte every ``delay``
    seconds), ``"endless"`` (200 ``image/png``, chunked: a PNG signature, then zeros until the
    client goes away or the server closes), ``"redirect"`` (302 to ``location``; by default
    the request's own path and query, so repeating it makes a loop), ``"svg"`` (200
    ``image/svg+xml``: an SVG with a ``<script>``) and ``"set_cookie"`` (the normal answer
    plus ``Set-Cookie: fake_cdn=...; Path=/``).  ``"drip"`` and ``"endless"`` answer whether
    or not the task exists.  [`make_png`][] builds such PNGs.

Counters
    ``counts`` (a ``collections.Counter`` keyed by body action, ``"invalid"`` when the body
    has none, counting every API request including faulted ones), ``batch_sizes`` (number of
    ids in each ``retrieve_batch``), ``batch_times`` (``time.monotonic()`` of each
    ``retrieve_batch``, for request rates) and ``reset_counts()`` (clears all three).

Callbacks
    A task with a ``callback_url`` is POSTed its result body once, unsigned, when it finishes;
    delivery errors are swallowed.  ``drop_callbacks(times=1)`` silently drops the next
    deliveries (counted in ``callbacks_dropped``); ``callback_deliveries`` lists
    [`CallbackDelivery`][] ``(task_id, url, status, error)`` for every attempt made.
"""

from __future__ import annotations

import asyncio
import collections
import json
import random
import re
import struct
import time
import uuid
import zlib
from collections.abc import Mapping
from functools import lru_cache
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, NamedTuple

import aiohttp
import attrs
from aiohttp import web

__all__ = [
    "ASPECT_RATIOS",
    "KNOWN_MODELS",
    "OUTCOMES",
    "RESOLUTIONS",
    "CallbackDelivery",
    "FakeNanoBanana",
    "FakeTask",
    "make_png",
]

_BASE_MODELS: Final = (
    "nano-banana",
    "nano-banana-2-lite",
    "nano-banana-2",
    "nano-banana-2.1",
    "nano-banana-pro",
)
KNOWN_MODELS: Final[frozenset[str]] = frozenset(
    _BASE_MODELS + tuple(f"{m}:official" for m in _BASE_MODELS)
)
"""Model names the fake accepts; anything else is a 400 ``bad_request``."""

ASPECT_RATIOS: Final[frozenset[str]] = frozenset(
    {"1:1", "3:2", "2:3", "16:9", "9:16", "4:3", "3:4"}
)
"""Documented ``aspect_ratio`` values."""

RESOLUTIONS: Final[frozenset[str]] = frozenset({"1K", "2K", "4K"})
"""Documented ``resolution`` values."""

OUTCOMES: Final[frozenset[str]] = frozenset({"succeed", "fail", "fail_top_level", "fail_no_images"})
"""Valid ``outcome`` values for [`FakeNanoBanana.add_task`][]."""

_FAILURE_ROTATION: Final = ("fail", "fail_top_level", "fail_no_images")
_PENDING_SHAPES: Final = frozenset({"ack", "none", "mixed"})
_FAULT_KINDS: Final = frozenset(
    {"error", "html", "rate_limit", "not_json", "drop", "slow", "gzip_bomb"}
)
_BOMB_BLOCK: Final = 1 << 20  # bytes of whitespace per deflate block of a gzip bomb
_IMAGE_FAULT_KINDS: Final = frozenset(
    {"html", "truncate", "error", "slow", "drip", "endless", "redirect", "svg", "set_cookie"}
)
_SVG: Final = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16">'
    "<script>alert(document.cookie)</script></svg>"
)
_ENDLESS_CHUNK: Final = bytes(64 * 1024)
_API_ACTIONS: Final = frozenset({"generate", "edit", "retrieve", "retrieve_batch"})
_IMAGE_NAME: Final = re.compile(r"(\d+)\.png")
_URL_PREFIXES: Final = ("http://", "https://")
_IMAGE_URL_PREFIXES: Final = ("http://", "https://", "data:image/")
_MAX_BODY: Final = 64 * 1024 * 1024

_STATUS_FOR_CODE: Final[Mapping[str, int]] = {
    "bad_request": 400,
    "no_token": 400,
    "api_not_implemented": 400,
    "disabled": 400,
    "invalid_token": 401,
    "token_expired": 401,
    "token_mismatched": 401,
    "used_up": 403,
    "forbidden": 403,
    "no_api": 404,
    "request_too_large": 413,
    "too_many_requests": 429,
    "api_error": 500,
}
_CODE_FOR_STATUS: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "invalid_token",
    403: "used_up",
    404: "no_api",
    413: "request_too_large",
    429: "too_many_requests",
}
_MESSAGE_FOR_CODE: Final[Mapping[str, str]] = {
    "api_error": "fetch failed",
    "bad_request": "bad request.",
    "invalid_token": "token is invalid.",
    "token_expired": "token is expired.",
    "used_up": "your balance is used up, please recharge.",
    "forbidden": "the request was refused by the content filter.",
    "no_api": "api not found.",
    "request_too_large": "request is too large.",
    "too_many_requests": "too many requests, please slow down.",
}
_NGINX_REASONS: Final[Mapping[int, str]] = {
    502: "Bad Gateway",
    503: "Service Temporarily Unavailable",
    504: "Gateway Time-out",
}
_DEFAULT_ERRORS: Final[Mapping[str, tuple[str, str]]] = {
    "fail": ("forbidden", "the prompt was refused by the content filter."),
    "fail_top_level": ("api_error", "image generation failed upstream."),
}


# --------------------------------------------------------------------------- PNG helpers


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    """Frame one PNG chunk (length, tag, data, CRC) as the format requires."""
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


@lru_cache(maxsize=512)
def make_png(width: int = 16, height: int = 16, rgb: tuple[int, int, int] = (255, 200, 0)) -> bytes:
    """Return a valid solid-colour RGB PNG, built with zlib and struct so no imaging library
    is needed."""
    row = b"\x00" + bytes(rgb) * width  # filter byte 0, then the pixels
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(row * height))
        + _png_chunk(b"IEND", b"")
    )


@lru_cache(maxsize=1)
def _bomb_block() -> tuple[bytes, bytes]:
    """A block of whitespace, and it as raw deflate ending in a full flush: after a full
    flush deflate forgets its history, so every such block compresses to the same bytes."""
    plain = b" " * _BOMB_BLOCK
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return plain, compressor.compress(plain) + compressor.flush(zlib.Z_FULL_FLUSH)


def _image_png(task_id: str, index: int) -> bytes:
    """Give each (task, index) its own stable colour so downloads can be told apart."""
    crc = zlib.crc32(f"{task_id}/{index}".encode())
    return make_png(16, 16, ((crc >> 16) & 255, (crc >> 8) & 255, crc & 255))


# --------------------------------------------------------------------------- data classes


class CallbackDelivery(NamedTuple):
    """One callback POST the server attempted: the receiver's status, or the error it hit."""

    task_id: str
    url: str
    status: int | None
    error: str | None


@attrs.define(eq=False)
class FakeTask:
    """One task on the fake server; its state is derived from ``finishes_at`` on every read,
    so thousands of tasks cost no timers."""

    id: str
    outcome: str
    prompt: str
    count: int
    request: dict[str, Any]
    callback_url: str | None
    trace_id: str
    object_id: str
    created_at: float
    """Submission time, ``time.time()``."""
    created_mono: float
    """Submission time, ``time.monotonic()``."""
    finishes_at: float
    """``time.monotonic()`` when the task is (or was) finished on the server."""
    finishes_at_wall: float
    """``time.time()`` when the task is (or was) finished on the server."""
    pending_ack: bool
    """Whether the pending record carries the submission acknowledgment as ``response``."""
    image_base_url: str
    identity: Mapping[str, str] = attrs.field(repr=False)
    error_code: str | None = None
    error_message: str | None = None
    callback_sent: bool = False
    _event: asyncio.Event | None = attrs.field(default=None, init=False, repr=False)

    @property
    def duration(self) -> float:
        """Seconds from submission to finish."""
        return self.finishes_at - self.created_mono

    def is_finished(self, now: float | None = None) -> bool:
        """Whether the task is done at monotonic time ``now`` (default: now)."""
        return (time.monotonic() if now is None else now) >= self.finishes_at

    @property
    def finished(self) -> bool:
        """Whether the task is done right now."""
        return self.is_finished()

    @property
    def image_urls(self) -> list[str]:
        """The URLs a successful task produces (empty for failures), on the image listener."""
        if self.outcome != "succeed":
            return []
        return [f"{self.image_base_url}/img/{self.id}/{i}.png" for i in range(self.count)]

    @property
    def error(self) -> dict[str, str] | None:
        """The ``{code, message}`` error of a failing task (shapes a and b), else ``None``."""
        if self.outcome not in _DEFAULT_ERRORS:
            return None
        code, message = _DEFAULT_ERRORS[self.outcome]
        return {"code": self.error_code or code, "message": self.error_message or message}

    def result(self) -> dict[str, Any]:
        """The finished answer body: what a synchronous submission and a callback receive."""
        body: dict[str, Any]
        error = self.error
        if error is not None:
            body = {"success": False, "task_id": self.id, "trace_id": self.trace_id}
            body["error"] = error
            return body
        data = [{"prompt": self.prompt, "image_url": url} for url in self.image_urls]
        return {"success": True, "task_id": self.id, "trace_id": self.trace_id, "data": data}

    def result_status(self) -> int:
        """The HTTP status a synchronous submission answers with once this task is done."""
        error = self.error
        if error is None:
            return 200
        return _STATUS_FOR_CODE.get(error["code"], 500)

    def record(self, now: float | None = None) -> dict[str, Any]:
        """The task record ``retrieve`` answers, as of monotonic time ``now`` (default: now)."""
        rec: dict[str, Any] = {"_id": self.object_id, "id": self.id}
        rec.update(self.identity)
        rec["created_at"] = self.created_at
        rec["type"] = "images"
        rec["trace_id"] = self.trace_id
        rec["request"] = dict(self.request)
        if not self.is_finished(now):
            if self.pending_ack:
                rec["response"] = {"success": True, "task_id": self.id, "trace_id": self.trace_id}
            return rec
        if self.outcome == "fail_top_level":
            rec["error"] = self.error
            return rec
        finished = self.finishes_at_wall
        taken = max(0.0, finished - self.created_at)
        rec["started_at"] = self.created_at + min(0.05, taken / 10)
        rec["finished_at"] = finished
        rec["elapsed"] = round(taken, 3)
        rec["response"] = self.result()
        return rec


@attrs.define
class _Fault:
    """A queued API fault and how many more requests it applies to."""

    kind: str
    remaining: int
    action: str | None
    status: int | None
    code: str | None
    message: str | None
    retry_after: float | str | None
    delay: float
    body: str | None
    size: int
    task_id: str | None = None


@attrs.define
class _ImageFault:
    """A queued image-listener fault and how many more requests it applies to."""

    kind: str
    remaining: int
    delay: float
    location: str | None = None


# --------------------------------------------------------------------------- the server


def _error_body(code: str, message: str) -> dict[str, Any]:
    """Build the service's error answer shape, with a fresh trace id."""
    return {
        "success": False,
        "error": {"code": code, "message": message},
        "trace_id": str(uuid.uuid4()),
    }


def _error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    """A JSON error answer like the real service's."""
    return web.json_response(_error_body(code, message), status=status, headers=headers)


def _nginx_page(status: int) -> str:
    """An HTML error page like nginx serves when the upstream is down."""
    reason = _NGINX_REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Error"
    title = f"{status} {reason}"
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n"
        f"<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n"
        "</body>\r\n</html>\r\n"
    )


def _format_retry_after(value: float | str) -> str:
    """Render a Retry-After value: whole seconds without a decimal point, strings verbatim."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


def _valid_image_urls(value: object) -> bool:
    """Whether ``value`` is a list of http(s) or ``data:image/`` URLs."""
    return isinstance(value, list) and all(
        isinstance(u, str) and u.startswith(_IMAGE_URL_PREFIXES) for u in value
    )


def _validate_submission(body: dict[str, Any]) -> str | None:
    """Check a submission like the service does; return the 400 message or ``None``."""
    action = body.get("action")
    if action not in ("generate", "edit"):
        return "action is invalid."
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return "prompt is required."
    model = body.get("model")
    if model is not None and model not in KNOWN_MODELS:
        return "model is invalid."
    image_urls = body.get("image_urls")
    if image_urls is not None and not _valid_image_urls(image_urls):
        return "image_urls is invalid."
    if action == "edit" and not image_urls:
        return "image_urls is required for edit."
    aspect_ratio = body.get("aspect_ratio")
    if aspect_ratio is not None and aspect_ratio not in ASPECT_RATIOS:
        return "aspect_ratio is invalid."
    resolution = body.get("resolution")
    if resolution is not None and resolution not in RESOLUTIONS:
        return "resolution is invalid."
    count = body.get("count")
    if count is not None and (
        not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 4
    ):
        return "count must be an integer between 1 and 4."
    callback_url = body.get("callback_url")
    if callback_url is not None and (
        not isinstance(callback_url, str) or not callback_url.startswith(_URL_PREFIXES)
    ):
        return "callback_url is invalid."
    if "async" in body and not isinstance(body["async"], bool):
        return "async must be a boolean."
    return None


class FakeNanoBanana:
    """An in-process fake of the Nano Banana API plus an image host; see the module docstring
    for the full behaviour and control surface."""

    def __init__(
        self,
        *,
        token: str = "test-token",
        duration: float | tuple[float, float] = 0.0,
        fail_rate: float = 0.0,
        pending_shape: str = "ack",
        seed: int | None = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        image_host: str = "localhost",
        image_port: int = 0,
    ) -> None:
        if isinstance(duration, tuple):
            lo, hi = (float(duration[0]), float(duration[1]))
            if not 0 <= lo <= hi:
                raise ValueError(f"duration range must satisfy 0 <= lo <= hi, got {duration!r}")
            self._duration: tuple[float, float] = (lo, hi)
        else:
            if duration < 0:
                raise ValueError(f"duration must be >= 0, got {duration!r}")
            self._duration = (float(duration), float(duration))
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail_rate must be within [0, 1], got {fail_rate!r}")
        if pending_shape not in _PENDING_SHAPES:
            raise ValueError(f"pending_shape must be one of {sorted(_PENDING_SHAPES)}")
        self.token = token
        self.duration = duration
        self.fail_rate = fail_rate
        self.pending_shape = pending_shape
        self.seed = seed
        self.host = host
        self.port = port
        self.image_host = image_host
        self.image_port = image_port

        self._rng = random.Random(seed)
        self._id_rng = random.Random(None if seed is None else f"ids-{seed}")
        self._identity: dict[str, str] = {
            name: self._new_uuid()
            for name in ("api_id", "application_id", "credential_id", "user_id")
        }
        self._task_serial = 0
        self._failure_serial = 0

        self.tasks: dict[str, FakeTask] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.batch_sizes: list[int] = []
        self.batch_times: list[float] = []
        self.image_requests: list[tuple[str, dict[str, str]]] = []
        self.callback_deliveries: list[CallbackDelivery] = []
        self.callbacks_dropped = 0

        self._faults: list[_Fault] = []
        self._image_faults: collections.deque[_ImageFault] = collections.deque()
        self._drop_callbacks = 0

        self._state = "new"
        self._loop: asyncio.AbstractEventLoop | None = None
        self._api_runner: web.AppRunner | None = None
        self._image_runner: web.AppRunner | None = None
        self._base_url: str | None = None
        self._image_base_url: str | None = None
        self._closing = asyncio.Event()
        self._held: set[FakeTask] = set()
        self._callback_handles: dict[str, asyncio.TimerHandle] = {}
        self._callback_tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Bind both listeners; the API on ``host:port`` and the image host on another port."""
        if self._state != "new":
            raise RuntimeError(f"FakeNanoBanana cannot start: it is {self._state}")
        self._state = "running"
        self._loop = asyncio.get_running_loop()
        api_app = web.Application(client_max_size=_MAX_BODY)
        api_app.router.add_post("/nano-banana/images", self._handle_images)
        api_app.router.add_post("/nano-banana/tasks", self._handle_tasks)
        api_app.router.add_route("*", "/{tail:.*}", self._handle_unknown)
        image_app = web.Application()
        image_app.router.add_get("/img/{task_id}/{name}", self._handle_image)
        try:
            self._api_runner = await self._serve(api_app, self.host, self.port)
            self._base_url = (
                f"http://{self._url_host(self.host)}:{self._bound_port(self._api_runner)}"
            )
            self._image_runner = await self._serve(image_app, self.host, self.image_port)
            image_port = self._bound_port(self._image_runner)
            self._image_base_url = f"http://{self._url_host(self.image_host)}:{image_port}"
        except BaseException:
            await self.close()
            raise

    @staticmethod
    async def _serve(app: web.Application, host: str, port: int) -> web.AppRunner:
        """Start one quiet listener (no access log, no signal handlers, short shutdown)."""
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        return runner

    @staticmethod
    def _bound_port(runner: web.AppRunner) -> int:
        """The port the OS actually gave a listener."""
        return int(runner.addresses[0][1])

    @staticmethod
    def _url_host(host: str) -> str:
        """How to address a bound host in a URL (wildcards become loopback, IPv6 bracketed)."""
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    async def close(self) -> None:
        """Stop both listeners, answer held requests, cancel callbacks; safe to call twice."""
        if self._state == "closed":
            return
        self._state = "closed"
        self._closing.set()
        for task in self._held:
            if task._event is not None:
                task._event.set()
        for runner in (self._api_runner, self._image_runner):
            if runner is not None:
                await runner.cleanup()
        for handle in self._callback_handles.values():
            handle.cancel()
        self._callback_handles.clear()
        pending = list(self._callback_tasks)
        for delivery in pending:
            delivery.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> FakeNanoBanana:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        where = f" base_url={self._base_url!r} image_base_url={self._image_base_url!r}"
        if self._state != "running":
            where = ""
        return f"<FakeNanoBanana {self._state}{where} tasks={len(self.tasks)}>"

    @property
    def base_url(self) -> str:
        """The API's base URL, ``http://127.0.0.1:<port>``."""
        if self._base_url is None:
            raise RuntimeError("FakeNanoBanana is not started")
        return self._base_url

    @property
    def image_base_url(self) -> str:
        """The image host's base URL, ``http://localhost:<port2>``."""
        if self._image_base_url is None:
            raise RuntimeError("FakeNanoBanana is not started")
        return self._image_base_url

    # ----------------------------------------------------------------- direct control

    def add_task(
        self,
        *,
        duration: float | None = None,
        outcome: str = "succeed",
        count: int = 1,
        prompt: str = "a test image",
        callback_url: str | None = None,
        task_id: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> str:
        """Create a task without HTTP, as if it had been submitted asynchronously; returns its id.

        ``outcome`` is ``"succeed"``, ``"fail"`` (shape a), ``"fail_top_level"`` (shape b) or
        ``"fail_no_images"`` (shape c); ``duration=None`` uses the server's duration setting.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(OUTCOMES)}, got {outcome!r}")
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        if duration is not None and duration < 0:
            raise ValueError(f"duration must be >= 0, got {duration!r}")
        if task_id is not None and task_id in self.tasks:
            raise ValueError(f"task id {task_id!r} already exists")
        request: dict[str, Any] = {"action": "generate", "prompt": prompt, "async": True}
        if count != 1:
            request["count"] = count
        if callback_url is not None:
            request["callback_url"] = callback_url
        task = self._create_task(
            request,
            outcome=outcome,
            duration=self._draw_duration() if duration is None else duration,
            task_id=task_id,
            error_code=error_code,
            error_message=error_message,
        )
        return task.id

    def finish(self, task_id: str) -> None:
        """Finish a task now with its planned outcome (no-op if it is already finished)."""
        task = self.tasks[task_id]
        now = time.monotonic()
        if task.is_finished(now):
            return
        task.finishes_at = now
        task.finishes_at_wall = time.time()
        if task._event is not None:
            task._event.set()
        if task.callback_url is not None and not task.callback_sent:
            self._schedule_callback(task)

    def inject(
        self,
        kind: str,
        *,
        times: int = 1,
        action: str | None = None,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | str | None = None,
        delay: float = 0.0,
        message: str | None = None,
        body: str | None = None,
        size: int = 1 << 30,
        task_id: str | None = None,
    ) -> None:
        """Queue a fault for the next ``times`` API requests whose body action matches
        (and, with ``task_id``, that name that task: its ``id`` or one of its ``ids``)."""
        if kind not in _FAULT_KINDS:
            raise ValueError(f"fault kind must be one of {sorted(_FAULT_KINDS)}, got {kind!r}")
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times!r}")
        if action is not None and action not in _API_ACTIONS:
            raise ValueError(f"action must be one of {sorted(_API_ACTIONS)}, got {action!r}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size!r}")
        self._faults.append(
            _Fault(
                kind, times, action, status, code, message, retry_after, delay, body, size, task_id
            )
        )

    def inject_image(
        self, kind: str, *, times: int = 1, delay: float = 1.0, location: str | None = None
    ) -> None:
        """Queue a fault for the next ``times`` requests to the image listener.

        ``delay`` is the pause of ``"slow"`` and the interval of ``"drip"``; ``location``
        is where ``"redirect"`` points (default: the request's own path, a loop).
        """
        if kind not in _IMAGE_FAULT_KINDS:
            raise ValueError(
                f"image fault kind must be one of {sorted(_IMAGE_FAULT_KINDS)}, got {kind!r}"
            )
        if times < 1:
            raise ValueError(f"times must be >= 1, got {times!r}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay!r}")
        self._image_faults.append(_ImageFault(kind, times, delay, location))

    def clear_faults(self) -> None:
        """Forget every queued API and image fault."""
        self._faults.clear()
        self._image_faults.clear()

    def drop_callbacks(self, times: int = 1) -> None:
        """Silently drop the next ``times`` callback deliveries, like a lost POST."""
        if times < 0:
            raise ValueError(f"times must be >= 0, got {times!r}")
        self._drop_callbacks += times

    def reset_counts(self) -> None:
        """Clear ``counts``, ``batch_sizes`` and ``batch_times`` (e.g. between benchmark
        phases)."""
        self.counts.clear()
        self.batch_sizes.clear()
        self.batch_times.clear()

    # ----------------------------------------------------------------- task creation

    def _new_uuid(self) -> str:
        """A UUID4 string from the seeded id RNG, so seeded runs are reproducible."""
        return str(uuid.UUID(int=self._id_rng.getrandbits(128), version=4))

    def _draw_duration(self) -> float:
        """The duration of the next task, per the ``duration`` setting."""
        lo, hi = self._duration
        return lo if lo == hi else self._rng.uniform(lo, hi)

    def _outcome_for(self, prompt: str) -> str:
        """Decide an HTTP submission's outcome from prompt markers, then ``fail_rate``."""
        if "[fail:top]" in prompt:
            return "fail_top_level"
        if "[fail:empty]" in prompt:
            return "fail_no_images"
        if "[fail]" in prompt:
            return "fail"
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            outcome = _FAILURE_ROTATION[self._failure_serial % len(_FAILURE_ROTATION)]
            self._failure_serial += 1
            return outcome
        return "succeed"

    def _create_task(
        self,
        request: dict[str, Any],
        *,
        outcome: str,
        duration: float,
        task_id: str | None = None,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> FakeTask:
        """Register a task and, if it has a callback URL, its delivery timer."""
        if self._state != "running":
            raise RuntimeError("FakeNanoBanana must be running to create tasks")
        mono = time.monotonic()
        wall = time.time()
        if self.pending_shape == "mixed":
            pending_ack = self._task_serial % 2 == 0
        else:
            pending_ack = self.pending_shape == "ack"
        self._task_serial += 1
        callback_url = request.get("callback_url")
        task = FakeTask(
            id=task_id if task_id is not None else self._new_uuid(),
            outcome=outcome,
            prompt=str(request.get("prompt", "")),
            count=int(request.get("count", 1)),
            request=request,
            callback_url=callback_url if isinstance(callback_url, str) else None,
            trace_id=self._new_uuid(),
            object_id=f"{self._id_rng.getrandbits(96):024x}",
            created_at=wall,
            created_mono=mono,
            finishes_at=mono + duration,
            finishes_at_wall=wall + duration,
            pending_ack=pending_ack,
            image_base_url=self.image_base_url,
            identity=self._identity,
            error_code=error_code,
            error_message=error_message,
        )
        self.tasks[task.id] = task
        if task.callback_url is not None:
            self._schedule_callback(task)
        return task

    async def _wait_finished(self, task: FakeTask) -> bool:
        """Hold until ``task`` finishes (or the server closes: returns ``False``)."""
        self._held.add(task)
        try:
            while not self._closing.is_set():
                remaining = task.finishes_at - time.monotonic()
                if remaining <= 0:
                    return True
                if task._event is None:
                    task._event = asyncio.Event()
                try:
                    async with asyncio.timeout(remaining):
                        await task._event.wait()
                except TimeoutError:
                    pass
                task._event.clear()
            return False
        finally:
            self._held.discard(task)

    async def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` seconds unless the server closes first; ``False`` if it closed."""
        if delay > 0 and not self._closing.is_set():
            try:
                async with asyncio.timeout(delay):
                    await self._closing.wait()
            except TimeoutError:
                pass
        return not self._closing.is_set()

    # ----------------------------------------------------------------- callbacks

    def _schedule_callback(self, task: FakeTask) -> None:
        """(Re)arm the one timer that delivers ``task``'s callback when it finishes."""
        if self._loop is None or self._closing.is_set():
            return
        old = self._callback_handles.pop(task.id, None)
        if old is not None:
            old.cancel()
        delay = max(0.0, task.finishes_at - time.monotonic())
        self._callback_handles[task.id] = self._loop.call_later(delay, self._callback_due, task)

    def _callback_due(self, task: FakeTask) -> None:
        """Timer body: drop the delivery if asked to, else start the POST in the background."""
        self._callback_handles.pop(task.id, None)
        if self._loop is None or self._closing.is_set() or task.callback_sent:
            return
        task.callback_sent = True
        if self._drop_callbacks > 0:
            self._drop_callbacks -= 1
            self.callbacks_dropped += 1
            return
        delivery = self._loop.create_task(self._deliver(task))
        self._callback_tasks.add(delivery)
        delivery.add_done_callback(self._callback_tasks.discard)

    async def _deliver(self, task: FakeTask) -> None:
        """POST the result to the callback URL once; record the outcome, swallow errors."""
        url = task.callback_url
        assert url is not None
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.post(url, json=task.result()) as resp:
                await resp.read()
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the real service drops failed deliveries silently
            self.callback_deliveries.append(
                CallbackDelivery(task.id, url, None, f"{type(exc).__name__}: {exc}")
            )
        else:
            self.callback_deliveries.append(CallbackDelivery(task.id, url, status, None))

    # ----------------------------------------------------------------- API handlers

    async def _read_body(self, request: web.Request) -> tuple[dict[str, Any] | None, str]:
        """Parse the JSON body; return it (``None`` if unusable) and its counting key."""
        try:
            raw = await request.read()
            body = json.loads(raw)
        except (ValueError, web.HTTPRequestEntityTooLarge):
            return None, "invalid"
        if not isinstance(body, dict):
            return None, "invalid"
        action = body.get("action")
        return body, action if isinstance(action, str) else "invalid"

    def _take_fault(self, action: str, body: dict[str, Any] | None) -> _Fault | None:
        """Consume the first queued fault that matches ``action`` and ``body`` (FIFO)."""
        if not self._faults:
            return None
        named: set[Any] = set()
        if body is not None:
            ids = body.get("ids")
            named = {body.get("id"), *(ids if isinstance(ids, list) else ())}
        for i, fault in enumerate(self._faults):
            if fault.task_id is not None and fault.task_id not in named:
                continue
            if fault.action is None or fault.action == action:
                fault.remaining -= 1
                if fault.remaining <= 0:
                    del self._faults[i]
                return fault
        return None

    async def _apply_fault(self, request: web.Request, fault: _Fault) -> web.StreamResponse | None:
        """Answer a faulted request; ``None`` means carry on normally (after a slow pause)."""
        kind = fault.kind
        if kind == "slow":
            if await self._pause(fault.delay):
                return None
            return _error_response(503, "api_error", "server is shutting down.")
        if kind == "drop":
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=500)  # never written: the transport is gone
        if kind == "gzip_bomb":
            return await self._gzip_bomb(request, fault.status or 200, fault.size)
        if kind == "html":
            status = fault.status or 502
            return web.Response(text=_nginx_page(status), status=status, content_type="text/html")
        if kind == "not_json":
            text = fault.body if fault.body is not None else "<html>oops</html>"
            is_json = text.lstrip().startswith(("{", "["))
            return web.Response(
                text=text,
                status=fault.status or 200,
                content_type="application/json" if is_json else "text/html",
            )
        headers: dict[str, str] = {}
        if kind == "rate_limit":
            status = fault.status or 429
            code = fault.code or "too_many_requests"
            headers["Retry-After"] = _format_retry_after(
                fault.retry_after if fault.retry_after is not None else "1"
            )
        else:  # "error"
            if fault.status is None:
                code = fault.code or "api_error"
                status = _STATUS_FOR_CODE.get(code, 500)
            else:
                status = fault.status
                code = fault.code or _CODE_FOR_STATUS.get(status, "api_error")
            if fault.retry_after is not None:
                headers["Retry-After"] = _format_retry_after(fault.retry_after)
        message = fault.message or _MESSAGE_FOR_CODE.get(code, code.replace("_", " "))
        return _error_response(status, code, message, headers)

    async def _gzip_bomb(self, request: web.Request, status: int, size: int) -> web.StreamResponse:
        """Stream a gzip body that inflates to ``size`` bytes of whitespace, block by block."""
        blocks, tail = divmod(size, _BOMB_BLOCK)
        resp = web.StreamResponse(status=status)
        resp.content_type = "application/json"
        resp.headers["Content-Encoding"] = "gzip"
        await resp.prepare(request)
        plain, compressed = _bomb_block()
        crc = 0
        try:
            await resp.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff")  # gzip header
            for _ in range(blocks):
                if self._closing.is_set():
                    return resp
                await resp.write(compressed)
                crc = zlib.crc32(plain, crc)
            last = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            await resp.write(last.compress(b" " * tail) + last.flush())
            crc = zlib.crc32(b" " * tail, crc)
            await resp.write(struct.pack("<II", crc, size & 0xFFFFFFFF))
            await resp.write_eof()
        except (ConnectionError, RuntimeError):  # the client hung up: as it should
            pass
        return resp

    def _authorized(self, request: web.Request) -> bool:
        """Whether the request carries ``Authorization: Bearer <token>``."""
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and value.strip() == self.token

    async def _preamble(
        self, request: web.Request
    ) -> tuple[dict[str, Any] | None, web.StreamResponse | None]:
        """Shared start of every API call: parse, count, apply faults, check the token."""
        body, key = await self._read_body(request)
        self.counts[key] += 1
        if key == "retrieve_batch" and body is not None and isinstance(body.get("ids"), list):
            self.batch_sizes.append(len(body["ids"]))
            self.batch_times.append(time.monotonic())
        fault = self._take_fault(key, body)
        if fault is not None:
            answer = await self._apply_fault(request, fault)
            if answer is not None:
                return None, answer
        if self._closing.is_set():
            return None, _error_response(503, "api_error", "server is shutting down.")
        if not self._authorized(request):
            return None, _error_response(401, "invalid_token", "token is invalid.")
        if body is None:
            return None, _error_response(400, "bad_request", "body must be a JSON object.")
        return body, None

    async def _handle_images(self, request: web.Request) -> web.StreamResponse:
        """``POST /nano-banana/images``: validate, create a task, answer now or when done."""
        body, answer = await self._preamble(request)
        if answer is not None:
            return answer
        assert body is not None
        problem = _validate_submission(body)
        if problem is not None:
            return _error_response(400, "bad_request", problem)
        task = self._create_task(
            body, outcome=self._outcome_for(body["prompt"]), duration=self._draw_duration()
        )
        if body.get("async") is True or task.callback_url is not None:
            return web.json_response(
                {"success": True, "task_id": task.id, "trace_id": task.trace_id}
            )
        if not await self._wait_finished(task):
            return _error_response(503, "api_error", "server is shutting down.")
        return web.json_response(task.result(), status=task.result_status())

    async def _handle_tasks(self, request: web.Request) -> web.StreamResponse:
        """``POST /nano-banana/tasks``: ``retrieve`` one record or ``retrieve_batch`` many."""
        body, answer = await self._preamble(request)
        if answer is not None:
            return answer
        assert body is not None
        action = body.get("action")
        now = time.monotonic()
        if action == "retrieve":
            task_id = body.get("id")
            if not isinstance(task_id, str) or not task_id:
                return _error_response(400, "bad_request", "id is required.")
            task = self.tasks.get(task_id)
            return web.json_response(task.record(now) if task is not None else {})
        if action == "retrieve_batch":
            ids = body.get("ids")
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                return _error_response(400, "bad_request", "ids must be a list of task ids.")
            tasks = self.tasks
            items = [
                task.record(now)
                for task_id in dict.fromkeys(ids)
                if (task := tasks.get(task_id)) is not None
            ]
            return web.json_response({"items": items, "count": len(items)})
        return _error_response(400, "bad_request", "action is invalid.")

    async def _handle_unknown(self, request: web.Request) -> web.StreamResponse:
        """Any other path: the service's 404 ``no_api``."""
        return _error_response(404, "no_api", f"no api matches {request.path}.")

    # ----------------------------------------------------------------- image handler

    def _take_image_fault(self) -> _ImageFault | None:
        """Consume the next queued image fault, if any."""
        if not self._image_faults:
            return None
        fault = self._image_faults[0]
        fault.remaining -= 1
        if fault.remaining <= 0:
            self._image_faults.popleft()
        return fault

    async def _handle_image(self, request: web.Request) -> web.StreamResponse:
        """``GET /img/<task_id>/<i>.png``: a small PNG for a finished successful task."""
        self.image_requests.append((request.path, dict(request.headers)))
        fault = self._take_image_fault()
        if fault is not None:
            answer = await self._apply_image_fault(request, fault)
            if answer is not None:
                return answer
        task_id = request.match_info["task_id"]
        match = _IMAGE_NAME.fullmatch(request.match_info["name"])
        task = self.tasks.get(task_id)
        index = int(match.group(1)) if match else -1
        found = (
            task is not None
            and task.outcome == "succeed"
            and 0 <= index < task.count
            and task.is_finished()
        )
        png = _image_png(task_id, index)
        if fault is not None and fault.kind == "truncate":
            resp = web.StreamResponse()
            resp.content_type = "image/png"
            resp.content_length = len(png)
            await resp.prepare(request)
            await resp.write(png[: len(png) // 2])
            if request.transport is not None:
                request.transport.close()
            return resp
        if not found:
            return web.Response(status=404, text="404 Not Found")
        answer = web.Response(body=png, content_type="image/png")
        if fault is not None and fault.kind == "set_cookie":
            answer.set_cookie("fake_cdn", uuid.uuid4().hex, path="/")
        return answer

    async def _apply_image_fault(
        self, request: web.Request, fault: _ImageFault
    ) -> web.StreamResponse | None:
        """Answer a faulted image request; ``None`` means answer normally (after a pause)."""
        kind = fault.kind
        if kind == "slow" and not await self._pause(fault.delay):
            return web.Response(status=503, text="shutting down")
        if kind == "html":
            page = "<!DOCTYPE html><html><head><title>Just a moment...</title></head>"
            page += "<body>Checking your browser before accessing.</body></html>"
            return web.Response(text=page, content_type="text/html")
        if kind == "error":
            return web.Response(text=_nginx_page(500), status=500, content_type="text/html")
        if kind == "svg":
            return web.Response(body=_SVG.encode(), content_type="image/svg+xml")
        if kind == "redirect":
            location = fault.location if fault.location is not None else request.path_qs
            return web.Response(status=302, headers={"Location": location})
        if kind == "drip":
            return await self._drip(request, fault.delay)
        if kind == "endless":
            return await self._endless(request)
        return None

    async def _drip(self, request: web.Request, interval: float) -> web.StreamResponse:
        """A PNG with its full length, one byte per ``interval`` until done or closed."""
        png = make_png()
        resp = web.StreamResponse()
        resp.content_type = "image/png"
        resp.content_length = len(png)
        await resp.prepare(request)
        try:
            for i in range(len(png)):
                await resp.write(png[i : i + 1])
                if not await self._pause(interval):
                    break
        except ConnectionError:  # the client went away
            pass
        return resp

    async def _endless(self, request: web.Request) -> web.StreamResponse:
        """A PNG signature, then zeros for as long as the client reads (chunked)."""
        resp = web.StreamResponse()
        resp.content_type = "image/png"
        await resp.prepare(request)
        try:
            await resp.write(b"\x89PNG\r\n\x1a\n")
            while not self._closing.is_set():
                await resp.write(_ENDLESS_CHUNK)
        except ConnectionError:  # the client went away
            pass
        return resp
