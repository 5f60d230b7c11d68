"""Tests for the fake Nano Banana server, exercised over real HTTP with a raw aiohttp client."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from nanobanana_async.testing import (
    KNOWN_MODELS,
    CallbackDelivery,
    FakeNanoBanana,
    FakeTask,
    make_png,
)

TOKEN = "test-token"
WAIT = 3.0  # upper bound for every wait in this file; nothing should come close


# --------------------------------------------------------------------------- helpers


@pytest.fixture
async def server() -> AsyncIterator[FakeNanoBanana]:
    """A default fake server: instant tasks, no failures, ack-shaped pending records."""
    async with FakeNanoBanana() as srv:
        yield srv


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    """A raw aiohttp session with a short overall timeout."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


class Reply:
    """A fully read HTTP answer: status, headers, raw text and (if parseable) JSON."""

    def __init__(self, status: int, headers: dict[str, str], text: str) -> None:
        self.status = status
        self.headers = headers
        self.text = text
        try:
            self.json: Any = json.loads(text)
        except ValueError:
            self.json = None


async def post(
    http: aiohttp.ClientSession,
    url: str,
    body: Any,
    *,
    token: str | None = TOKEN,
    raw: bytes | None = None,
) -> Reply:
    """POST a JSON body (or raw bytes) with an optional bearer token and read the answer."""
    headers = {"Accept": "application/json", "Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with http.post(url, data=data, headers=headers) as resp:
        return Reply(resp.status, dict(resp.headers), await resp.text())


async def submit(
    http: aiohttp.ClientSession, server: FakeNanoBanana, body: Any, **kw: Any
) -> Reply:
    """POST to ``/nano-banana/images``."""
    return await post(http, server.base_url + "/nano-banana/images", body, **kw)


async def tasks_call(
    http: aiohttp.ClientSession, server: FakeNanoBanana, body: Any, **kw: Any
) -> Reply:
    """POST to ``/nano-banana/tasks``."""
    return await post(http, server.base_url + "/nano-banana/tasks", body, **kw)


async def retrieve(
    http: aiohttp.ClientSession, server: FakeNanoBanana, task_id: str
) -> dict[str, Any]:
    """Fetch one task record and check the call itself succeeded."""
    reply = await tasks_call(http, server, {"action": "retrieve", "id": task_id})
    assert reply.status == 200, reply.text
    assert isinstance(reply.json, dict)
    return reply.json


async def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll ``predicate`` until it holds, failing the test after ``timeout`` seconds."""
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - polls plain server state, no event to await
            await asyncio.sleep(0.005)


def assert_error(reply: Reply, status: int, code: str) -> None:
    """Check the service's JSON error shape."""
    assert reply.status == status, reply.text
    assert reply.json["success"] is False
    assert reply.json["error"]["code"] == code
    assert isinstance(reply.json["error"]["message"], str)
    assert isinstance(reply.json["trace_id"], str)


def parse_png(data: bytes) -> tuple[int, int, bytes]:
    """Validate a PNG's signature and chunk CRCs; return width, height and raw pixel rows."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        tag = data[pos + 4 : pos + 8]
        payload = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(tag + payload)
        chunks[tag] = payload
        pos += 12 + length
    assert set(chunks) == {b"IHDR", b"IDAT", b"IEND"}
    width, height = struct.unpack(">II", chunks[b"IHDR"][:8])
    return width, height, zlib.decompress(chunks[b"IDAT"])


def no_loud_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Assert aiohttp logged nothing at warning level or above (no tracebacks)."""
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == [], [r.getMessage() for r in loud]


# --------------------------------------------------------------------------- lifecycle


async def test_urls_and_repr() -> None:
    srv = FakeNanoBanana()
    assert "new" in repr(srv)
    with pytest.raises(RuntimeError, match="not started"):
        _ = srv.base_url
    async with srv:
        assert srv.base_url.startswith("http://127.0.0.1:")
        assert srv.image_base_url.startswith("http://localhost:")
        api_port = int(srv.base_url.rsplit(":", 1)[1])
        image_port = int(srv.image_base_url.rsplit(":", 1)[1])
        assert api_port != image_port
        assert api_port > 0
        assert srv.token == TOKEN
        assert srv.base_url in repr(srv)
        with pytest.raises(RuntimeError, match="cannot start"):
            await srv.start()
    assert "closed" in repr(srv)
    await srv.close()  # idempotent


async def test_custom_token_and_constructor_validation() -> None:
    async with FakeNanoBanana(token="s3cret") as srv:
        assert srv.token == "s3cret"
    with pytest.raises(ValueError, match="duration"):
        FakeNanoBanana(duration=-1)
    with pytest.raises(ValueError, match="duration"):
        FakeNanoBanana(duration=(2.0, 1.0))
    with pytest.raises(ValueError, match="fail_rate"):
        FakeNanoBanana(fail_rate=1.5)
    with pytest.raises(ValueError, match="pending_shape"):
        FakeNanoBanana(pending_shape="weird")


async def test_add_task_requires_running_server_and_validates() -> None:
    srv = FakeNanoBanana()
    with pytest.raises(RuntimeError, match="running"):
        srv.add_task()
    async with srv:
        with pytest.raises(ValueError, match="outcome"):
            srv.add_task(outcome="explode")
        with pytest.raises(ValueError, match="count"):
            srv.add_task(count=0)
        with pytest.raises(ValueError, match="duration"):
            srv.add_task(duration=-1.0)
        srv.add_task(task_id="mine")
        with pytest.raises(ValueError, match="already exists"):
            srv.add_task(task_id="mine")
        with pytest.raises(KeyError):
            srv.finish("nope")
    with pytest.raises(RuntimeError, match="running"):
        srv.add_task()


async def test_close_answers_held_requests_and_leaves_nothing_behind(
    http: aiohttp.ClientSession,
) -> None:
    srv = FakeNanoBanana(duration=60.0)
    await srv.start()
    held = asyncio.create_task(submit(http, srv, {"action": "generate", "prompt": "slow cat"}))
    srv.inject("slow", delay=60.0, action="retrieve")
    slow = asyncio.create_task(
        tasks_call(http, srv, {"action": "retrieve", "id": "x"}),
    )
    srv.add_task(callback_url="http://127.0.0.1:9/never")  # a timer that must be cancelled
    await wait_until(lambda: len(srv.tasks) == 2 and srv.counts["retrieve"] == 1)
    async with asyncio.timeout(WAIT):
        await srv.close()
        held_reply, slow_reply = await asyncio.gather(held, slow)
    assert_error(held_reply, 503, "api_error")
    assert_error(slow_reply, 503, "api_error")
    assert srv.callback_deliveries == []
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}


# --------------------------------------------------------------------------- auth and routing


@pytest.mark.parametrize("token", [None, "wrong-token", ""])
async def test_bad_token_is_401(
    server: FakeNanoBanana, http: aiohttp.ClientSession, token: str | None
) -> None:
    reply = await submit(http, server, {"action": "generate", "prompt": "x"}, token=token)
    assert_error(reply, 401, "invalid_token")
    reply = await tasks_call(http, server, {"action": "retrieve", "id": "x"}, token=token)
    assert_error(reply, 401, "invalid_token")
    assert server.tasks == {}


async def test_non_bearer_scheme_is_401(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    url = server.base_url + "/nano-banana/tasks"
    headers = {"Authorization": f"Basic {TOKEN}"}
    async with http.post(url, json={"action": "retrieve", "id": "x"}, headers=headers) as resp:
        assert resp.status == 401


async def test_unknown_path_is_no_api(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    reply = await post(http, server.base_url + "/suno/audios", {"action": "generate"})
    assert_error(reply, 404, "no_api")


# --------------------------------------------------------------------------- submission


async def test_async_submission_ack_and_pending_then_finished_record(
    http: aiohttp.ClientSession,
) -> None:
    async with FakeNanoBanana(duration=30.0) as srv:
        body = {"action": "generate", "prompt": "a white siamese cat", "async": True}
        before = time.time()
        reply = await submit(http, srv, body)
        assert reply.status == 200
        assert set(reply.json) == {"success", "task_id", "trace_id"}
        assert reply.json["success"] is True
        task_id = reply.json["task_id"]
        task = srv.tasks[task_id]
        assert isinstance(task, FakeTask)
        assert task.trace_id == reply.json["trace_id"]

        pending = await retrieve(http, srv, task_id)
        assert pending["id"] == task_id
        assert pending["type"] == "images"
        assert pending["request"] == body
        assert before <= pending["created_at"] <= time.time()
        for key in ("_id", "api_id", "application_id", "credential_id", "user_id", "trace_id"):
            assert isinstance(pending[key], str)
            assert pending[key]
        assert pending["response"] == {
            "success": True,
            "task_id": task_id,
            "trace_id": reply.json["trace_id"],
        }
        for key in ("started_at", "finished_at", "elapsed", "error"):
            assert key not in pending

        srv.finish(task_id)
        done = await retrieve(http, srv, task_id)
        assert done["created_at"] <= done["started_at"] <= done["finished_at"]
        assert done["elapsed"] == pytest.approx(done["finished_at"] - done["created_at"], abs=1e-3)
        assert done["response"]["success"] is True
        assert done["response"]["task_id"] == task_id
        assert done["response"]["data"] == [
            {"prompt": "a white siamese cat", "image_url": task.image_urls[0]}
        ]
        assert task.image_urls == [f"{srv.image_base_url}/img/{task_id}/0.png"]
        assert task.record() == done
        assert task.finished
        assert task.finishes_at <= time.monotonic()
        assert task.finishes_at_wall == done["finished_at"]


async def test_task_finishes_by_itself_after_duration(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=0.1) as srv:
        reply = await submit(http, srv, {"action": "generate", "prompt": "p", "async": True})
        task_id = reply.json["task_id"]
        assert "data" not in (await retrieve(http, srv, task_id))["response"]
        await wait_until(lambda: srv.tasks[task_id].finished)
        record = await retrieve(http, srv, task_id)
        assert len(record["response"]["data"]) == 1
        assert "finished_at" in record


async def test_pending_shape_none(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=30.0, pending_shape="none") as srv:
        reply = await submit(http, srv, {"action": "generate", "prompt": "p", "async": True})
        record = await retrieve(http, srv, reply.json["task_id"])
        assert "response" not in record
        assert "finished_at" not in record


async def test_pending_shape_mixed_alternates(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=30.0, pending_shape="mixed") as srv:
        ids = [srv.add_task() for _ in range(4)]
        reply = await tasks_call(http, srv, {"action": "retrieve_batch", "ids": ids})
        shapes = ["response" in item for item in reply.json["items"]]
        assert shapes == [True, False, True, False]


async def test_count_makes_that_many_images(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    body = {"action": "generate", "prompt": "four cats", "count": 3, "async": True}
    reply = await submit(http, server, body)
    task_id = reply.json["task_id"]
    data = (await retrieve(http, server, task_id))["response"]["data"]
    assert [d["image_url"] for d in data] == [
        f"{server.image_base_url}/img/{task_id}/{i}.png" for i in range(3)
    ]
    assert all(d["prompt"] == "four cats" for d in data)


async def test_edit_with_image_urls_is_accepted(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    body = {
        "action": "edit",
        "prompt": "make it blue",
        "image_urls": ["https://example.com/a.png", "data:image/png;base64,AAAA"],
        "aspect_ratio": "16:9",
        "resolution": "2K",
        "model": "nano-banana-pro",
        "async": True,
    }
    reply = await submit(http, server, body)
    assert reply.status == 200
    assert server.tasks[reply.json["task_id"]].request == body


@pytest.mark.parametrize("model", sorted(KNOWN_MODELS))
async def test_known_models_are_accepted(
    server: FakeNanoBanana, http: aiohttp.ClientSession, model: str
) -> None:
    reply = await submit(
        http, server, {"action": "generate", "prompt": "p", "model": model, "async": True}
    )
    assert reply.status == 200, reply.text


@pytest.mark.parametrize(
    "body",
    [
        {"action": "generate"},
        {"action": "generate", "prompt": "   "},
        {"action": "generate", "prompt": 5},
        {"prompt": "no action"},
        {"action": "paint", "prompt": "p"},
        {"action": "edit", "prompt": "p"},
        {"action": "edit", "prompt": "p", "image_urls": []},
        {"action": "edit", "prompt": "p", "image_urls": ["ftp://x/y.png"]},
        {"action": "generate", "prompt": "p", "count": 0},
        {"action": "generate", "prompt": "p", "count": 5},
        {"action": "generate", "prompt": "p", "count": True},
        {"action": "generate", "prompt": "p", "count": "2"},
        {"action": "generate", "prompt": "p", "model": "nano-banana-9"},
        {"action": "generate", "prompt": "p", "model": "nano-banana:unofficial"},
        {"action": "generate", "prompt": "p", "aspect_ratio": "5:4"},
        {"action": "generate", "prompt": "p", "resolution": "8K"},
        {"action": "generate", "prompt": "p", "callback_url": "not a url"},
        {"action": "generate", "prompt": "p", "async": "yes"},
        ["not", "an", "object"],
    ],
)
async def test_invalid_submissions_are_400(
    server: FakeNanoBanana, http: aiohttp.ClientSession, body: Any
) -> None:
    reply = await submit(http, server, body)
    assert_error(reply, 400, "bad_request")
    assert server.tasks == {}


async def test_non_json_submission_is_400(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    reply = await submit(http, server, None, raw=b"{not json")
    assert_error(reply, 400, "bad_request")
    assert server.counts["invalid"] == 1


async def test_sync_submission_waits_for_the_result(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=0.1) as srv:
        reply = await submit(http, srv, {"action": "generate", "prompt": "sync cat"})
        assert reply.status == 200
        assert reply.json["success"] is True
        task = srv.tasks[reply.json["task_id"]]
        assert task.finished
        assert reply.json["trace_id"] == task.trace_id
        assert reply.json["data"] == [{"prompt": "sync cat", "image_url": task.image_urls[0]}]


async def test_sync_submission_released_by_finish(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=60.0) as srv:
        pending = asyncio.create_task(submit(http, srv, {"action": "generate", "prompt": "p"}))
        await wait_until(lambda: len(srv.tasks) == 1)
        assert not pending.done()
        srv.finish(next(iter(srv.tasks)))
        async with asyncio.timeout(WAIT):
            reply = await pending
        assert reply.status == 200
        assert len(reply.json["data"]) == 1


@pytest.mark.parametrize(
    ("marker", "status", "expected"),
    [
        ("[fail]", 403, {"success": False, "code": "forbidden"}),
        ("[fail:top]", 500, {"success": False, "code": "api_error"}),
        ("[fail:empty]", 200, {"success": True, "code": None}),
    ],
)
async def test_sync_failures(
    server: FakeNanoBanana,
    http: aiohttp.ClientSession,
    marker: str,
    status: int,
    expected: dict[str, Any],
) -> None:
    reply = await submit(http, server, {"action": "generate", "prompt": f"cat {marker}"})
    assert reply.status == status
    assert reply.json["success"] is expected["success"]
    assert reply.json["task_id"] in server.tasks
    if expected["code"] is None:
        assert reply.json["data"] == []
    else:
        assert reply.json["error"]["code"] == expected["code"]


# --------------------------------------------------------------------------- failure shapes


def check_failure_shape(record: dict[str, Any], outcome: str) -> None:
    """Check a finished failing record has exactly the documented shape for ``outcome``."""
    if outcome == "fail":
        assert record["response"]["success"] is False
        assert record["response"]["task_id"] == record["id"]
        assert record["response"]["trace_id"] == record["trace_id"]
        assert set(record["response"]["error"]) == {"code", "message"}
        assert "finished_at" in record
        assert "error" not in record
    elif outcome == "fail_top_level":
        assert set(record["error"]) == {"code", "message"}
        assert "response" not in record
        assert "finished_at" not in record
    else:
        assert record["response"] == {
            "success": True,
            "task_id": record["id"],
            "trace_id": record["trace_id"],
            "data": [],
        }
        assert "finished_at" in record
        assert "error" not in record


@pytest.mark.parametrize(
    ("marker", "outcome"),
    [("[fail]", "fail"), ("[fail:top]", "fail_top_level"), ("[fail:empty]", "fail_no_images")],
)
async def test_prompt_markers_choose_failure_shape(
    server: FakeNanoBanana, http: aiohttp.ClientSession, marker: str, outcome: str
) -> None:
    reply = await submit(
        http, server, {"action": "generate", "prompt": f"x {marker} y", "async": True}
    )
    task = server.tasks[reply.json["task_id"]]
    assert task.outcome == outcome
    assert task.image_urls == []
    check_failure_shape(await retrieve(http, server, task.id), outcome)
    if outcome == "fail":
        assert task.record()["response"]["error"]["code"] == "forbidden"


@pytest.mark.parametrize("outcome", ["fail", "fail_top_level", "fail_no_images"])
async def test_add_task_failure_shapes(
    server: FakeNanoBanana, http: aiohttp.ClientSession, outcome: str
) -> None:
    task_id = server.add_task(outcome=outcome, duration=30.0)
    pending = await retrieve(http, server, task_id)
    assert "error" not in pending
    assert "data" not in pending["response"]
    server.finish(task_id)
    check_failure_shape(await retrieve(http, server, task_id), outcome)


async def test_add_task_custom_error_and_id(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    task_id = server.add_task(
        outcome="fail", error_code="used_up", error_message="no money", task_id="t-1"
    )
    assert task_id == "t-1"
    record = await retrieve(http, server, "t-1")
    assert record["response"]["error"] == {"code": "used_up", "message": "no money"}


async def test_fail_rate_one_rotates_all_shapes(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(fail_rate=1.0) as srv:
        outcomes = []
        for i in range(6):
            reply = await submit(
                http, srv, {"action": "generate", "prompt": f"p{i}", "async": True}
            )
            task_id = reply.json["task_id"]
            outcome = srv.tasks[task_id].outcome
            outcomes.append(outcome)
            check_failure_shape(await retrieve(http, srv, task_id), outcome)
        assert outcomes == ["fail", "fail_top_level", "fail_no_images"] * 2


async def test_fail_rate_is_seeded(http: aiohttp.ClientSession) -> None:
    async def run(seed: int) -> tuple[list[str], list[str]]:
        async with FakeNanoBanana(fail_rate=0.5, seed=seed) as srv:
            for i in range(30):
                await submit(http, srv, {"action": "generate", "prompt": f"p{i}", "async": True})
            return [t.outcome for t in srv.tasks.values()], list(srv.tasks)

    first, second = await run(7), await run(7)
    assert first == second
    assert "succeed" in first[0]
    assert set(first[0]) - {"succeed"}


async def test_duration_range(http: aiohttp.ClientSession) -> None:
    async with FakeNanoBanana(duration=(0.05, 0.2)) as srv:
        durations = [srv.tasks[srv.add_task()].duration for _ in range(50)]
        assert all(0.05 - 1e-9 <= d <= 0.2 + 1e-9 for d in durations)
        assert len(set(durations)) > 1
        assert srv.tasks[srv.add_task(duration=0.0)].finished


# --------------------------------------------------------------------------- tasks endpoint


async def test_retrieve_unknown_is_empty_object(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    reply = await tasks_call(http, server, {"action": "retrieve", "id": "no-such-task"})
    assert reply.status == 200
    assert reply.json == {}


async def test_retrieve_batch_omits_unknown_ids(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    ids = [server.add_task(duration=30.0 if i % 2 else 0.0) for i in range(100)]
    asked = [*ids[:48], "ghost-1", ids[0], "ghost-2"]
    reply = await tasks_call(http, server, {"action": "retrieve_batch", "ids": asked})
    assert reply.status == 200
    assert reply.json["count"] == 48
    assert [item["id"] for item in reply.json["items"]] == ids[:48]
    assert reply.json["items"][0]["response"]["data"]
    assert "data" not in reply.json["items"][1]["response"]
    assert server.batch_sizes == [51]

    empty = await tasks_call(http, server, {"action": "retrieve_batch", "ids": ["ghost"]})
    assert empty.json == {"items": [], "count": 0}


@pytest.mark.parametrize(
    "body",
    [
        {"action": "retrieve"},
        {"action": "retrieve", "id": 5},
        {"action": "retrieve_batch"},
        {"action": "retrieve_batch", "ids": "abc"},
        {"action": "retrieve_batch", "ids": ["a", 1]},
        {"action": "list"},
        {"id": "x"},
        "retrieve",
    ],
)
async def test_bad_task_queries_are_400(
    server: FakeNanoBanana, http: aiohttp.ClientSession, body: Any
) -> None:
    assert_error(await tasks_call(http, server, body), 400, "bad_request")


# --------------------------------------------------------------------------- counters


async def test_counters(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    gen = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    edit_body = {"action": "edit", "prompt": "p", "image_urls": ["https://x/y.png"]}
    await submit(http, server, {**edit_body, "async": True})
    task_id = gen.json["task_id"]
    await retrieve(http, server, task_id)
    await retrieve(http, server, "unknown")
    await tasks_call(http, server, {"action": "retrieve_batch", "ids": [task_id, "a", "b"]})
    await tasks_call(http, server, {"action": "retrieve_batch", "ids": [task_id]})
    server.inject("error", action="generate")
    await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    await submit(http, server, {"action": "generate", "prompt": "p"}, token="bad")
    assert server.counts == {"generate": 3, "edit": 1, "retrieve": 2, "retrieve_batch": 2}
    assert server.batch_sizes == [3, 1]
    server.reset_counts()
    assert server.counts == {}
    assert server.batch_sizes == []
    assert len(server.tasks) == 2


# --------------------------------------------------------------------------- API faults


async def test_error_fault_default(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    server.inject("error")
    reply = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert_error(reply, 500, "api_error")
    assert reply.json["error"]["message"] == "fetch failed"
    assert server.tasks == {}
    again = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert again.status == 200
    assert len(server.tasks) == 1
    assert server.counts["generate"] == 2


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"status": 403, "code": "used_up"}, 403, "used_up"),
        ({"status": 401, "code": "invalid_token"}, 401, "invalid_token"),
        ({"status": 429, "code": "too_many_requests"}, 429, "too_many_requests"),
        ({"code": "used_up"}, 403, "used_up"),
        ({"code": "forbidden"}, 403, "forbidden"),
        ({"status": 401}, 401, "invalid_token"),
        ({"status": 503}, 503, "api_error"),
    ],
)
async def test_error_fault_overrides(
    server: FakeNanoBanana,
    http: aiohttp.ClientSession,
    kwargs: dict[str, Any],
    status: int,
    code: str,
) -> None:
    server.inject("error", **kwargs)
    reply = await tasks_call(http, server, {"action": "retrieve", "id": "x"})
    assert_error(reply, status, code)
    assert "Retry-After" not in reply.headers


async def test_error_fault_with_message_and_retry_after(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    server.inject("error", status=503, message="maintenance", retry_after=2)
    reply = await tasks_call(http, server, {"action": "retrieve", "id": "x"})
    assert reply.json["error"]["message"] == "maintenance"
    assert reply.headers["Retry-After"] == "2"


@pytest.mark.parametrize(
    ("status", "reason"),
    [(None, "502 Bad Gateway"), (503, "503 Service"), (504, "504 Gateway Time-out")],
)
async def test_html_fault(
    server: FakeNanoBanana, http: aiohttp.ClientSession, status: int | None, reason: str
) -> None:
    server.inject("html", status=status)
    reply = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert reply.status == (status or 502)
    assert reply.headers["Content-Type"].startswith("text/html")
    assert reason in reply.text
    assert "nginx" in reply.text
    assert reply.json is None
    assert server.tasks == {}


@pytest.mark.parametrize(
    ("retry_after", "header"), [(None, "1"), (3, "3"), (2.5, "2.5"), ("0", "0")]
)
async def test_rate_limit_fault(
    server: FakeNanoBanana,
    http: aiohttp.ClientSession,
    retry_after: float | str | None,
    header: str,
) -> None:
    server.inject("rate_limit", retry_after=retry_after)
    reply = await tasks_call(http, server, {"action": "retrieve_batch", "ids": ["a"]})
    assert_error(reply, 429, "too_many_requests")
    assert reply.headers["Retry-After"] == header


async def test_not_json_fault(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    server.inject("not_json")
    url = server.base_url + "/nano-banana/tasks"
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with http.post(url, json={"action": "retrieve", "id": "x"}, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.text() == "<html>oops</html>"
        with pytest.raises(aiohttp.ContentTypeError):
            await resp.json()

    server.inject("not_json", body='{"success": tr')
    reply = await tasks_call(http, server, {"action": "retrieve", "id": "x"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("application/json")
    assert reply.text == '{"success": tr'
    assert reply.json is None


async def test_drop_fault_disconnects_quietly(
    server: FakeNanoBanana, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    server.inject("drop", action="generate")
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert server.tasks == {}
    assert server.counts["generate"] == 1
    reply = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert reply.status == 200
    no_loud_logs(caplog)


async def test_slow_fault_delays_then_answers(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    server.inject("slow", delay=0.3)
    pending = asyncio.create_task(
        submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    )
    await wait_until(lambda: server.counts["generate"] == 1)
    await asyncio.sleep(0.05)
    assert not pending.done()
    assert server.tasks == {}
    async with asyncio.timeout(WAIT):
        reply = await pending
    assert reply.status == 200
    assert reply.json["task_id"] in server.tasks


async def test_fault_action_filter_times_and_fifo(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    server.inject("error", action="retrieve", times=2)
    server.inject("html")
    gen = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert gen.status == 502  # the retrieve-only faults skip it; the catch-all html hits
    ok = await submit(http, server, {"action": "generate", "prompt": "p", "async": True})
    assert ok.status == 200
    for _ in range(2):
        assert_error(
            await tasks_call(http, server, {"action": "retrieve", "id": "x"}), 500, "api_error"
        )
    assert (await tasks_call(http, server, {"action": "retrieve", "id": "x"})).status == 200

    server.inject("error")
    server.inject("rate_limit")
    assert (await tasks_call(http, server, {"action": "retrieve", "id": "x"})).status == 500
    assert (await tasks_call(http, server, {"action": "retrieve", "id": "x"})).status == 429
    assert (await tasks_call(http, server, {"action": "retrieve", "id": "x"})).status == 200

    server.inject("error", times=5)
    server.clear_faults()
    assert (await tasks_call(http, server, {"action": "retrieve", "id": "x"})).status == 200


async def test_inject_validation(server: FakeNanoBanana) -> None:
    with pytest.raises(ValueError, match="kind"):
        server.inject("explode")
    with pytest.raises(ValueError, match="times"):
        server.inject("error", times=0)
    with pytest.raises(ValueError, match="action"):
        server.inject("error", action="delete")
    with pytest.raises(ValueError, match="kind"):
        server.inject_image("drop")
    with pytest.raises(ValueError, match="times"):
        server.drop_callbacks(-1)


# --------------------------------------------------------------------------- image host


async def get_image(http: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], bytes]:
    """GET an image URL without any Authorization header."""
    async with http.get(url) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def test_image_host_serves_png_without_auth(
    server: FakeNanoBanana, http: aiohttp.ClientSession
) -> None:
    task_id = server.add_task(count=2)
    urls = server.tasks[task_id].image_urls
    status, headers, data = await get_image(http, urls[0])
    assert status == 200
    assert headers["Content-Type"] == "image/png"
    assert int(headers["Content-Length"]) == len(data)
    width, height, pixels = parse_png(data)
    assert (width, height) == (16, 16)
    assert len(pixels) == 16 * (1 + 16 * 3)
    _, _, other = await get_image(http, urls[1])
    assert other != data  # each image has its own colour

    assert [path for path, _ in server.image_requests] == [
        f"/img/{task_id}/0.png",
        f"/img/{task_id}/1.png",
    ]
    for _, sent in server.image_requests:
        assert "authorization" not in {k.lower() for k in sent}

    async with http.get(urls[0], headers={"Authorization": "Bearer leak"}) as resp:
        assert resp.status == 200
    assert server.image_requests[-1][1]["Authorization"] == "Bearer leak"
    assert server.counts == {}  # image downloads are not API calls


def test_make_png_is_valid() -> None:
    width, height, pixels = parse_png(make_png(3, 2, (1, 2, 3)))
    assert (width, height) == (3, 2)
    assert pixels == (b"\x00" + b"\x01\x02\x03" * 3) * 2


async def test_image_host_404s(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    done = server.add_task(count=1)
    pending = server.add_task(duration=30.0)
    failed = server.add_task(outcome="fail")
    base = server.image_base_url
    for path in (
        "/img/unknown/0.png",
        f"/img/{done}/1.png",
        f"/img/{done}/x.png",
        f"/img/{done}/0.jpg",
        f"/img/{pending}/0.png",
        f"/img/{failed}/0.png",
        "/elsewhere",
    ):
        status, _, _ = await get_image(http, base + path)
        assert status == 404, path


async def test_image_faults(
    server: FakeNanoBanana, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = server.tasks[server.add_task()].image_urls[0]
    status, _, normal = await get_image(http, url)
    assert status == 200

    server.inject_image("html")
    status, headers, data = await get_image(http, url)
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert data.startswith(b"<!DOCTYPE html>")

    server.inject_image("error", times=2)
    for _ in range(2):
        assert (await get_image(http, url))[0] == 500

    server.inject_image("truncate")
    async with http.get(url) as resp:
        assert resp.status == 200
        full = int(resp.headers["Content-Length"])
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    assert full == len(normal)

    server.inject_image("slow", delay=0.3)
    pending = asyncio.create_task(get_image(http, url))
    await wait_until(lambda: len(server.image_requests) == 6)
    await asyncio.sleep(0.05)
    assert not pending.done()
    async with asyncio.timeout(WAIT):
        status, _, data = await pending
    assert status == 200
    assert data == normal

    status, _, data = await get_image(http, url)
    assert status == 200
    parse_png(data)
    no_loud_logs(caplog)


async def test_hostile_image_faults(server: FakeNanoBanana, http: aiohttp.ClientSession) -> None:
    url = server.tasks[server.add_task()].image_urls[0]
    _, _, normal = await get_image(http, url)

    server.inject_image("drip", delay=0.001)
    async with asyncio.timeout(WAIT), http.get(url) as resp:
        assert resp.content_length == len(make_png())
        assert await resp.read() == make_png()

    server.inject_image("endless")
    async with asyncio.timeout(WAIT), http.get(url) as resp:
        assert resp.content_length is None
        received = await resp.content.readexactly(8)
        while len(received) < 1_000_000:
            received += await resp.content.read(64 * 1024)
    assert received.startswith(b"\x89PNG\r\n\x1a\n")

    server.inject_image("redirect")
    async with http.get(f"{url}?sig=1", allow_redirects=False) as resp:
        assert resp.status == 302
        assert resp.headers["Location"] == f"{URL(url).path}?sig=1"
    server.inject_image("redirect", location="http://169.254.169.254/")
    async with http.get(url, allow_redirects=False) as resp:
        assert resp.headers["Location"] == "http://169.254.169.254/"

    server.inject_image("svg")
    status, headers, data = await get_image(http, url)
    assert status == 200
    assert headers["Content-Type"] == "image/svg+xml"
    assert b"<script>" in data

    server.inject_image("set_cookie")
    async with aiohttp.ClientSession() as fresh, fresh.get(url) as resp:
        assert resp.cookies["fake_cdn"].value
        assert await resp.read() == normal


# --------------------------------------------------------------------------- callbacks


class Receiver:
    """A tiny aiohttp.web app on 127.0.0.1:0 that records the callbacks it receives."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.status = 200
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.json())
        self.headers.append(dict(request.headers))
        return web.Response(status=self.status, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/hook"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A running callback receiver."""
    rec = Receiver()
    await rec.start()
    yield rec
    await rec.close()


async def test_callback_delivered_once_on_success(
    http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    async with FakeNanoBanana(duration=0.1) as srv:
        body = {"action": "generate", "prompt": "cb cat", "callback_url": receiver.url}
        reply = await submit(http, srv, body)  # a callback_url makes it asynchronous
        assert reply.status == 200
        assert "data" not in reply.json
        task = srv.tasks[reply.json["task_id"]]
        await wait_until(lambda: len(srv.callback_deliveries) == 1)
        assert receiver.bodies == [
            {
                "success": True,
                "task_id": task.id,
                "trace_id": task.trace_id,
                "data": [{"prompt": "cb cat", "image_url": task.image_urls[0]}],
            }
        ]
        assert srv.callback_deliveries == [CallbackDelivery(task.id, receiver.url, 200, None)]
        assert task.callback_sent
        srv.finish(task.id)  # already finished: no second delivery
        await asyncio.sleep(0.1)
        assert len(receiver.bodies) == 1
        assert not any(k.lower() == "authorization" for k in receiver.headers[0])


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("fail", {"success": False, "code": "forbidden"}),
        ("fail_top_level", {"success": False, "code": "api_error"}),
        ("fail_no_images", {"success": True, "code": None}),
    ],
)
async def test_callback_on_failure(
    server: FakeNanoBanana, receiver: Receiver, outcome: str, expected: dict[str, Any]
) -> None:
    task_id = server.add_task(outcome=outcome, callback_url=receiver.url)
    await wait_until(lambda: len(receiver.bodies) == 1)
    body = receiver.bodies[0]
    assert body["task_id"] == task_id
    assert body["trace_id"] == server.tasks[task_id].trace_id
    assert body["success"] is expected["success"]
    if expected["code"] is None:
        assert body["data"] == []
    else:
        assert body["error"]["code"] == expected["code"]


async def test_finish_triggers_callback_early(server: FakeNanoBanana, receiver: Receiver) -> None:
    task_id = server.add_task(duration=60.0, callback_url=receiver.url)
    await asyncio.sleep(0.05)
    assert receiver.bodies == []
    server.finish(task_id)
    await wait_until(lambda: len(receiver.bodies) == 1)
    assert receiver.bodies[0]["task_id"] == task_id


async def test_drop_callbacks(server: FakeNanoBanana, receiver: Receiver) -> None:
    server.drop_callbacks(1)
    dropped = server.add_task(callback_url=receiver.url)
    await wait_until(lambda: server.callbacks_dropped == 1)
    kept = server.add_task(callback_url=receiver.url)
    await wait_until(lambda: len(receiver.bodies) == 1)
    assert receiver.bodies[0]["task_id"] == kept
    assert [d.task_id for d in server.callback_deliveries] == [kept]
    assert server.tasks[dropped].callback_sent
    await asyncio.sleep(0.05)
    assert len(receiver.bodies) == 1


async def test_callback_errors_are_recorded_not_raised(
    server: FakeNanoBanana, receiver: Receiver
) -> None:
    receiver.status = 500
    server.add_task(callback_url=receiver.url)
    with socket.socket() as sock:  # find a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]
    dead_url = f"http://127.0.0.1:{dead_port}/hook"
    dead = server.add_task(callback_url=dead_url)
    await wait_until(lambda: len(server.callback_deliveries) == 2)
    by_url = {d.url: d for d in server.callback_deliveries}
    assert by_url[receiver.url].status == 500
    assert by_url[dead_url].status is None
    assert by_url[dead_url].task_id == dead
    assert by_url[dead_url].error


async def test_close_cancels_pending_callbacks(receiver: Receiver) -> None:
    srv = FakeNanoBanana()
    await srv.start()
    for _ in range(20):
        srv.add_task(duration=60.0, callback_url=receiver.url)
    srv.add_task(duration=0.0, callback_url=receiver.url)  # due now, maybe in flight
    await srv.close()
    await asyncio.sleep(0.05)
    assert len(receiver.bodies) <= 1
    assert asyncio.all_tasks() == {asyncio.current_task()}
