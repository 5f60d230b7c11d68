"""The request path against hostile and broken answers, over real HTTP on loopback.

Each test reproduces one defect found by trying the client as an attacker would (the
request-path issue, items 1-9); hostile answers come from ``FakeNanoBanana`` fault
injection or from small servers in this file.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import FAST, load_fixture
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.traceback import Traceback

from nanobanana_async import (
    APIConnectionError,
    AuthenticationError,
    NanoBananaClient,
    NanoBananaError,
    RateLimitError,
    ResponseDecodeError,
    RetryPolicy,
    ServerError,
    TaskState,
)
from nanobanana_async.cli._main import main_async
from nanobanana_async.testing import FakeNanoBanana

MakeClient = Callable[..., NanoBananaClient]
MAY_HAVE_CREATED = "may have reached the service"

# Waits small enough for tests, large enough that retrying at once would show.
SHORT = RetryPolicy(initial_wait=0.04, max_wait=0.2, jitter=False, max_retries=3)


def notes(exc: BaseException) -> str:
    return " ".join(getattr(exc, "__notes__", []))


# --- 1. Retry-After never shortens the policy's own backoff ------------------------------


@pytest.mark.parametrize("hint", ["0", "-5", "Wed, 21 Oct 2015 07:28:00 GMT"])
async def test_a_zero_negative_or_past_retry_after_does_not_storm(
    make_client: MakeClient, server: FakeNanoBanana, hint: str
) -> None:
    server.inject("rate_limit", retry_after=hint, times=10)
    loop = asyncio.get_running_loop()
    async with make_client(retry=SHORT) as client:
        started = loop.time()
        with pytest.raises(RateLimitError):
            await client.retrieve("x")
        waited = loop.time() - started
    assert server.counts["retrieve"] == 4
    assert waited >= sum(SHORT.min_wait(n) for n in (1, 2, 3))  # 0.04 + 0.08 + 0.16


def test_retry_after_is_capped_in_one_place() -> None:
    hint = RateLimitError("slow down", retry_after=100.0)
    assert RetryPolicy(max_retry_after=120).wait(1, hint) == 100.0
    assert RetryPolicy(max_retry_after=30).wait(1, hint) == 30.0
    # A hint lengthens the backoff, never shortens it.
    policy = RetryPolicy(initial_wait=2.0, jitter=False)
    assert policy.wait(1, RateLimitError("x", retry_after=0.0)) == 2.0


def test_retry_policy_refuses_nonsense() -> None:
    for options in (
        {"max_retries": True},
        {"max_retries": -1},
        {"initial_wait": float("nan")},
        {"max_wait": float("inf")},
        {"max_time": 0},
        {"max_retry_after": -1},
    ):
        with pytest.raises(ValueError, match=next(iter(options))):
            RetryPolicy(**options)  # type: ignore[arg-type]


async def test_retries_never_hurry_to_fit_max_time(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    # backoff would shorten the last wait to the time left; the policy gives up instead.
    server.inject("error", status=503, times=10)
    policy = RetryPolicy(initial_wait=0.1, jitter=False, max_retries=5, max_time=0.25)
    async with make_client(retry=policy) as client:
        with pytest.raises(ServerError):
            await client.retrieve("x")
    assert server.counts["retrieve"] == 2  # waits of 0.1 then 0.2 would end past 0.25


# --- 2. an error in a 200 body is the same error as a status -----------------------------


@pytest.mark.parametrize("code", ["too_many_requests", "api_error"])
async def test_an_error_in_a_200_body_is_retried_like_the_status(
    client: NanoBananaClient, server: FakeNanoBanana, code: str
) -> None:
    task_id = server.add_task()
    server.inject("error", status=200, code=code, action="retrieve", times=2)
    assert (await client.retrieve(task_id)).done
    assert server.counts["retrieve"] == 3


async def test_a_429_in_a_200_body_retries_a_submission(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    server.inject("error", status=200, code="too_many_requests", action="generate")
    submission = await client.generate("a cat")
    assert submission.task_id in server.tasks
    assert server.counts["generate"] == 2


# --- 3. hostile nesting ------------------------------------------------------------------


NESTED = "[" * 100_000


async def test_deeply_nested_json_is_a_decode_error(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    server.inject("not_json", body=NESTED, times=3)
    with pytest.raises(ResponseDecodeError):
        await client.retrieve("x")
    with pytest.raises(ResponseDecodeError):
        await client.retrieve_batch(["x", "y"])
    with pytest.raises(ResponseDecodeError) as info:
        await client.generate("a cat")
    assert MAY_HAVE_CREATED in notes(info.value)


async def test_deeply_nested_json_fails_no_waiter(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    ids = [server.add_task(duration=0.05) for _ in range(3)]
    server.inject("not_json", body=NESTED, action="retrieve_batch")
    async with asyncio.timeout(10):
        urls = await asyncio.gather(*(client.await_completion(task_id) for task_id in ids))
    assert all(urls)


# --- 4. strict task ids --------------------------------------------------------------------


@pytest.mark.parametrize("task_id", ["null", '{"a": 1}', "true", "[1]", "7", '""'])
async def test_a_submission_answer_without_a_task_id_string_is_an_error(
    client: NanoBananaClient, server: FakeNanoBanana, task_id: str
) -> None:
    server.inject("not_json", action="generate", body=f'{{"success": true, "task_id": {task_id}}}')
    with pytest.raises(ResponseDecodeError, match="task_id") as info:
        await client.generate("a cat")
    assert MAY_HAVE_CREATED in notes(info.value)
    assert task_id in info.value.body_excerpt
    if task_id not in ("null", '""'):
        # Whatever stands there reaches the user: "7" may be the paid task's id.
        assert "it holds" in str(info.value)


@pytest.mark.parametrize(("status", "error"), [(500, ServerError), (429, RateLimitError)])
async def test_an_error_answer_that_names_a_task_gives_its_id_and_is_not_sent_again(
    client: NanoBananaClient, server: FakeNanoBanana, status: int, error: type[Exception]
) -> None:
    # Found in review: the id was dropped, and a 429 naming a task was retried, so the
    # user got a second paid task's id and lost the first.
    body = {"success": False, "task_id": "T-1", "error": {"code": "x", "message": "busy"}}
    server.inject("not_json", action="generate", status=status, body=json.dumps(body), times=5)
    with pytest.raises(error) as info:
        await client.generate("a cat")
    assert getattr(info.value, "task_id", None) == "T-1"
    assert "The answer named task T-1" in notes(info.value)
    assert server.counts["generate"] == 1


# --- 5. answer size ------------------------------------------------------------------------


async def test_a_gzip_bomb_is_refused_while_it_inflates(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    server.inject("gzip_bomb", size=64 << 20)
    async with make_client(max_response_bytes=4 << 20) as client:
        with pytest.raises(ResponseDecodeError, match="larger than") as info:
            await client.retrieve("x")
    assert info.value.status == 200
    assert server.counts["retrieve"] == 1  # a bomb is not retried


async def test_a_large_content_length_is_refused_before_reading(
    make_client: MakeClient, server: FakeNanoBanana
) -> None:
    server.inject("not_json", body="[" + " " * (2 << 20) + "]", times=2)
    async with make_client(max_response_bytes=1 << 20) as client:
        with pytest.raises(ResponseDecodeError, match="larger than"):
            await client.retrieve("x")
        with pytest.raises(ResponseDecodeError, match="larger than") as info:
            await client.generate("a cat")
    assert MAY_HAVE_CREATED in notes(info.value)


def test_max_response_bytes_is_checked() -> None:
    for bad in (0, 1.5, True, None):
        with pytest.raises(ValueError, match="max_response_bytes"):
            NanoBananaClient("t", max_response_bytes=bad)  # type: ignore[arg-type]


# --- 6. a 2xx submission answer that cannot be read may still have made a task ------------


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("not_json", {"body": "<html>hello</html>"}),
        ("not_json", {"body": ""}),
        ("not_json", {"body": '{"success": true, "trace_id": "t-1"}'}),
        ("error", {"status": 200, "code": "api_error"}),
    ],
)
async def test_an_unreadable_2xx_submission_answer_says_it_may_have_made_a_task(
    client: NanoBananaClient, server: FakeNanoBanana, kind: str, options: dict[str, Any]
) -> None:
    server.inject(kind, action="generate", **options)
    with pytest.raises(NanoBananaError) as info:
        await client.generate("a cat")
    assert MAY_HAVE_CREATED in notes(info.value)
    assert server.counts["generate"] == 1


# --- 7. odd bookkeeping fields do not hide a finished task's images ------------------------


def finished_record(task_id: str, **changes: Any) -> dict[str, Any]:
    record = load_fixture("task_succeeded.json")
    record["id"] = record["response"]["task_id"] = task_id
    record.update(changes)
    return record


ODD_FIELDS = [
    {"elapsed": "11.3"},
    {"created_at": "2025-09-06T18:23:56Z"},
    {"request": "generate a cat"},
    {"trace_id": 7},
    # Valid JSON, and no float: it raised a raw OverflowError, hiding the images.
    {"created_at": 10**400, "elapsed": -(10**400)},
]


@pytest.mark.parametrize("changes", ODD_FIELDS)
async def test_odd_bookkeeping_fields_do_not_fail_a_finished_task(
    client: NanoBananaClient, server: FakeNanoBanana, changes: dict[str, Any]
) -> None:
    record = finished_record("odd", **changes)
    server.inject("not_json", action="retrieve", body=json.dumps(record))
    assert (await client.retrieve("odd")).state is TaskState.SUCCEEDED
    server.inject("not_json", action="retrieve_batch", body=json.dumps({"items": [record]}))
    async with asyncio.timeout(10):
        urls = await client.await_completion("odd")
    assert urls == [record["response"]["data"][0]["image_url"]]


async def test_a_null_image_beside_a_good_one(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    record = finished_record("odd")
    good = record["response"]["data"][0]
    record["response"]["data"] = [None, good]
    server.inject("not_json", action="retrieve", body=json.dumps(record))
    assert (await client.retrieve("odd")).image_urls == [good["image_url"]]


# --- 8. an answer about another task -------------------------------------------------------


async def test_retrieve_refuses_the_record_of_another_task(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    server.inject("not_json", action="retrieve", body=json.dumps(finished_record("B")))
    with pytest.raises(ResponseDecodeError, match=r"'A'.*'B'"):
        await client.retrieve("A")


async def test_retrieve_batch_drops_records_not_asked_for(
    client: NanoBananaClient, server: FakeNanoBanana
) -> None:
    body = {"items": [finished_record("A"), finished_record("B")], "count": 2}
    server.inject("not_json", action="retrieve_batch", body=json.dumps(body))
    batch = await client.retrieve_batch(["A", "C"])
    assert [task.id for task in batch.items] == ["A"]


# --- 9. the token stays out of reach -----------------------------------------------------


SECRET = "sk-hostile-0123456789"


@pytest.fixture
async def garbage_server() -> AsyncIterator[str]:
    """A TCP server that answers every request with bytes that are not HTTP."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(65536)
        writer.write(b"HTTP/1.1 2OO NOT OK\r\nbroken header\r\n\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


async def caught(call: Awaitable[object]) -> BaseException:
    """The exception ``call`` raises, caught in a frame that holds no secret."""
    try:
        await call
    except BaseException as exc:
        return exc
    raise AssertionError("the call did not fail")


def rendered(exc: BaseException) -> str:
    """The exception as tracebacks with locals show it: the stdlib's and rich's."""
    text = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    console = Console(file=io.StringIO(), width=200)
    console.print(Traceback.from_exception(type(exc), exc, exc.__traceback__, show_locals=True))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return text + out


def reachable(exc: BaseException) -> list[Any]:
    """Every exception in the chain, and the request info any of them carries."""
    found: list[Any] = []
    seen: BaseException | None = exc
    while seen is not None and len(found) < 20:
        found.append(seen)
        found.append(getattr(seen, "request_info", None))
        seen = seen.__cause__ or seen.__context__
    return found


async def test_the_token_is_not_reachable_from_a_connection_error(garbage_server: str) -> None:
    async with NanoBananaClient(SECRET, base_url=garbage_server, **FAST) as client:
        exc = await caught(client.retrieve("x"))
    assert isinstance(exc, APIConnectionError)
    assert exc.__cause__ is None
    assert exc.__context__ is None
    assert SECRET not in repr(reachable(exc))
    assert SECRET not in rendered(exc)


async def test_the_token_is_not_shown_in_tracebacks_of_api_errors(
    server: FakeNanoBanana,
) -> None:
    server.inject("not_json", body=NESTED)
    async with NanoBananaClient(SECRET, base_url=server.base_url, **FAST) as client:
        exc = await caught(client.retrieve("x"))
    assert isinstance(exc, ResponseDecodeError)
    assert SECRET not in rendered(exc)


@pytest.fixture
async def echo_server() -> AsyncIterator[str]:
    """A server that echoes the request's Authorization header in its answers, as an
    echo service or debug proxy at a wrong base URL would."""

    async def handle(request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        kind = request.match_info["tail"]
        if kind.startswith("json"):
            body = {"success": False, "error": {"code": "invalid_token", "message": header}}
            return web.json_response(body, status=401)
        page = f"<html><title>502 {header}</title><body>{header}</body></html>"
        return web.Response(text=page, status=502, content_type="text/html")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("kind", ["json", "html"])
async def test_an_answer_that_echoes_the_token_never_shows_it(
    echo_server: str, kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with NanoBananaClient(SECRET, base_url=f"{echo_server}/{kind}", **FAST) as client:
        exc = await caught(client.retrieve("x"))
        waited = await caught(client.wait("x", timeout=0.5))
    assert isinstance(exc, AuthenticationError if kind == "json" else ServerError)
    for error in (exc, waited):
        assert SECRET not in str(error) + repr(error) + notes(error)
        assert SECRET not in str(getattr(error, "body_excerpt", ""))
        assert SECRET not in rendered(error)
    assert SECRET not in caplog.text


async def test_a_refused_large_answer_leaves_no_response_in_the_traceback(
    server: FakeNanoBanana,
) -> None:
    """The response object (whose request_info holds the Authorization header) was a
    local of the frame that raised the size error."""
    server.inject("gzip_bomb", size=4 * 1024 * 1024)
    async with NanoBananaClient(
        SECRET, base_url=server.base_url, max_response_bytes=1024 * 1024, **FAST
    ) as client:
        exc = await caught(client.retrieve("x"))
    assert isinstance(exc, ResponseDecodeError)
    frames = traceback.walk_tb(exc.__traceback__)
    assert not any(
        isinstance(value, aiohttp.ClientResponse)
        for frame, _ in frames
        for value in frame.f_locals.values()
    )


# --- a small scripted server, for answers FakeNanoBanana does not make ---------------------


class Scripted:
    """Answers each request with the next (status, headers, body) of its script."""

    def __init__(self) -> None:
        self.script: list[tuple[int, dict[str, str], bytes]] = []
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        await request.read()
        self.requests += 1
        status, headers, body = self.script.pop(0) if self.script else (200, {}, b"{}")
        return web.Response(status=status, headers=headers, body=body)


@pytest.fixture
async def scripted() -> AsyncIterator[tuple[Scripted, str]]:
    script = Scripted()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", script.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield script, f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


# --- any answer at all: only our errors, bounded attempts, never hurried -------------------

PROPERTY_POLICY = RetryPolicy(
    max_retries=2, initial_wait=0.002, max_wait=0.004, max_retry_after=0.01, jitter=True
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
error_codes = st.sampled_from(
    ["too_many_requests", "api_error", "bad_request", "invalid_token", "used_up", "x", ""]
)
bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=64),
    st.sampled_from([b"", NESTED.encode(), b"{" * 5000, b'{"items": [' * 3000]),
    st.builds(
        lambda code, success: json.dumps(
            {"success": success, "error": {"code": code, "message": "m"}}
        ).encode(),
        error_codes,
        st.sampled_from([False, None, True]),
    ),
    st.builds(
        lambda record: json.dumps({"items": [record], "count": "many"}).encode(),
        json_values,
    ),
)
retry_afters = st.sampled_from(
    [None, "0", "-3", "0.001", "1e9", "nan", "inf", "soon", "Wed, 21 Oct 2015 07:28:00 GMT"]
)
answers = st.tuples(
    st.sampled_from([200, 201, 204, 301, 400, 401, 403, 404, 413, 429, 500, 502, 503, 504, 599]),
    retry_afters.map(lambda value: {} if value is None else {"Retry-After": value}),
    bodies,
)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(answers, min_size=1, max_size=4), batch=st.booleans())
async def test_any_answer_yields_only_our_errors_within_the_policy(
    scripted: tuple[Scripted, str], script: list[Any], batch: bool
) -> None:
    server, base_url = scripted
    server.script = list(script)
    server.requests = 0
    loop = asyncio.get_running_loop()
    async with NanoBananaClient(
        "t", base_url=base_url, retry=PROPERTY_POLICY, timeout=5.0
    ) as client:
        started = loop.time()
        try:
            async with asyncio.timeout(10):
                if batch:
                    await client.retrieve_batch(["a", "b"])
                else:
                    await client.retrieve("a")
        except NanoBananaError:
            pass
        elapsed = loop.time() - started
    assert 1 <= server.requests <= PROPERTY_POLICY.max_retries + 1
    retries = server.requests - 1
    assert elapsed >= sum(PROPERTY_POLICY.min_wait(n) for n in range(1, retries + 1))


async def test_the_cli_reports_a_nested_answer_as_an_api_error(
    server: FakeNanoBanana, capsys: pytest.CaptureFixture[str]
) -> None:
    server.inject("not_json", body=NESTED, times=5)
    argv = ["--token", server.token, "--base-url", server.base_url, "tasks", "get", "x"]
    async with asyncio.timeout(30):
        code = await main_async(argv, stdin=io.StringIO(""))
    err = capsys.readouterr().err
    assert code == 3
    assert "RecursionError" not in err
    assert "not JSON" in err
