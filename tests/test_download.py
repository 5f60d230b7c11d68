"""Downloads over real HTTP: the fake server's image host, plus a tiny host for odd answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from nanobanana_async import (
    APITimeoutError,
    DownloadError,
    NanoBananaClient,
    RetryPolicy,
    Task,
)
from nanobanana_async.testing import FakeNanoBanana, make_png

MakeClient = Callable[..., NanoBananaClient]
WAIT = 5.0  # upper bound on every wait here; nothing should come close
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


async def finished(client: NanoBananaClient, server: FakeNanoBanana, count: int = 1) -> Task:
    """A task of the fake server that has finished with ``count`` images."""
    task_id = server.add_task(duration=0, count=count)
    return await client.wait(task_id, timeout=WAIT)


def leftovers(folder: Path) -> list[str]:
    """Every entry in ``folder``, hidden ones (temporary ``.part`` files) included."""
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


async def fetch_raw(url: str) -> bytes:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session,
        session.get(url) as response,
    ):
        return await response.read()


@pytest.fixture
async def odd_host() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A host whose ``/stall`` sends half an image and then hangs until the test ends.

    Also ``/photo`` (a JPEG with no extension in the URL) and ``/`` (a PNG at the root).
    Yields its base URL and an event set once ``/stall`` has sent its first half.
    """
    half_sent = asyncio.Event()
    release = asyncio.Event()

    async def stall(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "image/png"
        response.content_length = 200_000
        await response.prepare(request)
        await response.write(PNG_MAGIC + b"\0" * (100_000 - len(PNG_MAGIC)))
        half_sent.set()
        await release.wait()
        return response

    async def photo(request: web.Request) -> web.Response:
        return web.Response(body=b"\xff\xd8\xff\xe0 not really", content_type="image/jpeg")

    async def root(request: web.Request) -> web.Response:
        return web.Response(body=make_png(), content_type="image/png")

    app = web.Application()
    app.router.add_get("/stall", stall)
    app.router.add_get("/photo", photo)
    app.router.add_get("/", root)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", half_sent
    finally:
        release.set()
        await runner.cleanup()


# --- single downloads ------------------------------------------------------------------


async def test_download_into_folder_names_file_from_url_and_type(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    path = await client.download(task.image_urls[0], tmp_path)
    assert path == tmp_path / f"{task.id}_0.png"
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert data == await fetch_raw(task.image_urls[0])
    assert leftovers(tmp_path) == [path.name]


async def test_download_to_file_path_creates_parents(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    dest = tmp_path / "a" / "b" / "picture.bin"
    path = await client.download(task.image_urls[0], str(dest))
    assert path == dest
    assert dest.read_bytes().startswith(PNG_MAGIC)


async def test_download_to_missing_folder_with_trailing_slash(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    path = await client.download(task.image_urls[0], f"{tmp_path}/new/")
    assert path == tmp_path / "new" / f"{task.id}_0.png"


async def test_download_overwrites_existing_file(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    dest = tmp_path / "x.png"
    dest.write_bytes(b"old")
    await client.download(task.image_urls[0], dest)
    assert dest.read_bytes().startswith(PNG_MAGIC)


async def test_extension_from_content_type_and_hash_name(
    client: NanoBananaClient, odd_host: tuple[str, asyncio.Event], tmp_path: Path
) -> None:
    base, _ = odd_host
    photo = await client.download(f"{base}/photo?sig=abc", tmp_path)
    assert photo.name == "photo.jpg"
    root = await client.download(f"{base}/", tmp_path)
    assert root.suffix == ".png"
    assert len(root.stem) == 16
    assert all(c in "0123456789abcdef" for c in root.stem)


async def test_never_sends_the_token_to_the_image_host(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server, count=2)
    await client.download_all(task, tmp_path)
    await client.download(task.image_urls[0], tmp_path / "again.png")
    assert len(server.image_requests) == 3
    for _, headers in server.image_requests:
        assert "authorization" not in {name.lower() for name in headers}
        assert not any(server.token in value for value in headers.values())


async def test_non_image_answer_is_refused_without_retry(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("html")
    with pytest.raises(DownloadError, match="text/html") as caught:
        await client.download(task.image_urls[0], tmp_path)
    assert caught.value.status == 200
    assert caught.value.url == task.image_urls[0]
    assert len(server.image_requests) == 1
    assert leftovers(tmp_path) == []


async def test_missing_image_is_a_404_not_retried(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    url = task.image_urls[0].replace("/0.png", "/7.png")
    with pytest.raises(DownloadError) as caught:
        await client.download(url, tmp_path)
    assert caught.value.status == 404
    assert len(server.image_requests) == 1
    assert leftovers(tmp_path) == []


async def test_server_error_is_retried(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("error", times=2)
    path = await client.download(task.image_urls[0], tmp_path)
    assert path.read_bytes().startswith(PNG_MAGIC)
    assert len(server.image_requests) == 3


async def test_truncated_body_is_retried_then_saved(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("truncate")
    path = await client.download(task.image_urls[0], tmp_path)
    assert path.read_bytes() == await fetch_raw(task.image_urls[0])
    assert len(server.image_requests) == 3  # cut, complete, and our raw check
    assert leftovers(tmp_path) == [path.name]


async def test_truncated_every_time_leaves_nothing(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    async with make_client(retry=RetryPolicy.no_wait(max_retries=1)) as client:
        task = await finished(client, server)
        server.inject_image("truncate", times=2)
        with pytest.raises(DownloadError, match="cut short") as caught:
            await client.download(task.image_urls[0], tmp_path)
    assert caught.value.url == task.image_urls[0]
    assert len(server.image_requests) == 2
    assert leftovers(tmp_path) == []


async def test_silent_host_times_out(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    async with make_client(timeout=0.2, retry=RetryPolicy.no_wait(max_retries=1)) as client:
        task = await finished(client, server)
        server.inject_image("slow", times=2, delay=3.0)
        with pytest.raises(APITimeoutError):
            await client.download(task.image_urls[0], tmp_path)
    assert len(server.image_requests) == 2
    assert leftovers(tmp_path) == []


async def test_cancel_mid_body_removes_the_partial_file(
    client: NanoBananaClient, odd_host: tuple[str, asyncio.Event], tmp_path: Path
) -> None:
    base, half_sent = odd_host
    job = asyncio.create_task(client.download(f"{base}/stall", tmp_path))
    async with asyncio.timeout(WAIT):
        await half_sent.wait()
        # No event says the body has started arriving in a .part file: look for it.
        while not leftovers(tmp_path):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert leftovers(tmp_path)[0].endswith(".part")
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert leftovers(tmp_path) == []


async def test_rejects_urls_it_cannot_fetch(client: NanoBananaClient, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="http"):
        await client.download("data:image/png;base64,AAAA", tmp_path)
    with pytest.raises(ValueError, match="http"):
        await client.download_all(["ftp://example.com/a.png"], tmp_path)


# --- download_all ----------------------------------------------------------------------


async def test_download_all_of_a_task_keeps_order(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server, count=4)
    paths = await client.download_all(task, tmp_path / "out", concurrency=2)
    assert paths == [tmp_path / "out" / f"{task.id}_{i}.png" for i in range(4)]
    contents = [path.read_bytes() for path in paths]
    assert len(set(contents)) == 4  # each image has its own colour
    for path, url in zip(paths, task.image_urls, strict=True):
        assert path.read_bytes() == await fetch_raw(url)


async def test_download_all_makes_names_unique(
    client: NanoBananaClient, odd_host: tuple[str, asyncio.Event], tmp_path: Path
) -> None:
    base, _ = odd_host
    urls = [f"{base}/photo", f"{base}/photo?size=2", f"{base}/photo"]
    paths = await client.download_all(urls, tmp_path)
    assert [path.name for path in paths] == ["photo.jpg", "photo-2.jpg", "photo-3.jpg"]


async def test_download_all_of_different_tasks_do_not_collide(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    first = await finished(client, server)
    second = await finished(client, server)
    paths = await client.download_all(first.image_urls + second.image_urls, tmp_path)
    assert len({path.name for path in paths}) == 2


async def test_download_all_failure_raises_and_leaves_no_partial_file(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server, count=2)
    bad = task.image_urls[0].replace("/0.png", "/9.png")
    with pytest.raises(DownloadError) as caught:
        await client.download_all([*task.image_urls, bad], tmp_path, concurrency=1)
    assert caught.value.status == 404
    assert not [name for name in leftovers(tmp_path) if name.endswith(".part")]
    assert f"{task.id}_9.png" not in leftovers(tmp_path)


async def test_download_all_cancels_the_rest_on_failure(
    client: NanoBananaClient,
    server: FakeNanoBanana,
    odd_host: tuple[str, asyncio.Event],
    tmp_path: Path,
) -> None:
    base, _ = odd_host
    task = await finished(client, server)
    bad = task.image_urls[0].replace("/0.png", "/9.png")

    async def fail_after_stall_started() -> list[Path]:
        return await client.download_all([f"{base}/stall", bad], tmp_path)

    job = asyncio.create_task(fail_after_stall_started())
    async with asyncio.timeout(WAIT):
        with pytest.raises(DownloadError):
            await job
    assert leftovers(tmp_path) == []


async def test_download_all_refuses_a_failed_task_and_bad_concurrency(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    failed = await client.wait(server.add_task(outcome="fail"), timeout=WAIT)
    with pytest.raises(ValueError, match="no images"):
        await client.download_all(failed, tmp_path)
    with pytest.raises(ValueError, match="concurrency"):
        await client.download_all(["http://localhost/a.png"], tmp_path, concurrency=0)
    assert await client.download_all([], tmp_path / "empty") == []
