"""Downloads against hostile image hosts (issue 8, items 10-14), over real HTTP on loopback.

Every image URL is chosen by the service, or by whoever forged a record: these answers
come from the fake server's image faults or from a small aiohttp host in this file.
"""

from __future__ import annotations

import asyncio
import gzip
import os
import stat
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from yarl import URL

from nanobanana_async import (
    APIConnectionError,
    APITimeoutError,
    ClientClosedError,
    DownloadError,
    NanoBananaClient,
    NanoBananaError,
    RetryPolicy,
    Task,
    TaskNotFoundError,
)
from nanobanana_async._addresses import GuardedResolver, Reach, guarded_connector, reach_of_host
from nanobanana_async._download import DEFAULT_MAX_BYTES, _check_redirect, _stem_for
from nanobanana_async._sniff import image_extension
from nanobanana_async.testing import FakeNanoBanana, make_png

MakeClient = Callable[..., NanoBananaClient]
WAIT = 5.0  # upper bound on every wait here; nothing should come close
PNG = make_png()
SECRET = "SIGNATURE-SECRET"


async def finished(client: NanoBananaClient, server: FakeNanoBanana, count: int = 1) -> Task:
    """A task of the fake server that has finished with ``count`` images."""
    task_id = server.add_task(duration=0, count=count)
    return await client.wait(task_id, timeout=WAIT)


def leftovers(folder: Path) -> list[str]:
    """Every entry in ``folder``, hidden ones (temporary ``.part`` files) included."""
    return sorted(path.name for path in folder.iterdir()) if folder.exists() else []


async def part_file_appears(folder: Path) -> None:
    """Wait until a ``.part`` file exists in ``folder`` (the body has started arriving)."""
    async with asyncio.timeout(WAIT):
        # No event says the body has started arriving in a .part file: look for it.
        while not any(name.endswith(".part") for name in leftovers(folder)):  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def rendered(exc: BaseException) -> str:
    """Everything a traceback printer shows for ``exc``, its causes included."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture
async def hostile() -> AsyncIterator[str]:
    """A small image host on 127.0.0.1 with answers the fake server does not give.

    ``/name/<anything>`` a PNG (any file name); ``/svg-as-png`` an SVG labelled
    ``image/png``; ``/png-as-jpeg`` a PNG labelled ``image/jpeg``; ``/octet`` a PNG
    labelled ``application/octet-stream``; ``/gzip`` a gzip-encoded PNG; ``/huge`` a
    ``Content-Length`` of 1 GB; ``/bytes/<hex>`` the given bytes as ``image/png``.
    """

    async def named(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def svg_as_png(request: web.Request) -> web.Response:
        return web.Response(body=b"<svg><script>alert(1)</script></svg>", content_type="image/png")

    async def png_as_jpeg(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/jpeg")

    async def octet(request: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="application/octet-stream")

    async def gzipped(request: web.Request) -> web.Response:
        body = gzip.compress(PNG)
        headers = {"Content-Encoding": "gzip"}
        return web.Response(body=body, content_type="image/png", headers=headers)

    async def huge(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_type = "image/png"
        response.content_length = 10**9
        await response.prepare(request)
        await response.write(PNG)
        return response

    async def raw(request: web.Request) -> web.Response:
        return web.Response(body=bytes.fromhex(request.match_info["hex"]), content_type="image/png")

    app = web.Application()
    app.router.add_get("/name/{name}", named)
    app.router.add_get("/svg-as-png", svg_as_png)
    app.router.add_get("/png-as-jpeg", png_as_jpeg)
    app.router.add_get("/octet", octet)
    app.router.add_get("/gzip", gzipped)
    app.router.add_get("/huge", huge)
    app.router.add_get("/bytes/{hex}", raw)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


# --- 10: aclose during a download -------------------------------------------------------


async def test_aclose_stops_a_download_in_progress(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    client = make_client(timeout=30.0)  # the per-attempt bound must not be what ends it
    task = await finished(client, server)
    server.inject_image("drip", delay=0.02)
    job = asyncio.create_task(client.download(task.image_urls[0], tmp_path))
    await part_file_appears(tmp_path)
    async with asyncio.timeout(WAIT):
        await client.aclose()
    assert job.done()  # aclose waited for the download to clean up
    with pytest.raises(ClientClosedError):
        await job
    assert leftovers(tmp_path) == []


async def test_aclose_stops_download_all_and_later_calls_fail(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    client = make_client(timeout=30.0)
    task = await finished(client, server, count=2)
    server.inject_image("drip", times=2, delay=0.02)
    job = asyncio.create_task(client.download_all(task, tmp_path))
    await part_file_appears(tmp_path)
    async with asyncio.timeout(WAIT):
        await client.aclose()
    with pytest.raises(ClientClosedError):
        await job
    assert leftovers(tmp_path) == []
    with pytest.raises(ClientClosedError):
        await client.download(task.image_urls[0], tmp_path)


async def test_cancelling_the_caller_still_cancels_during_aclose(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    client = make_client(timeout=30.0)
    task = await finished(client, server)
    server.inject_image("drip", delay=0.02)
    job = asyncio.create_task(client.download(task.image_urls[0], tmp_path))
    await part_file_appears(tmp_path)
    job.cancel()
    async with asyncio.timeout(WAIT):
        await client.aclose()
    with pytest.raises(asyncio.CancelledError):
        await job
    assert leftovers(tmp_path) == []


# --- 11: size cap and a deadline per attempt ----------------------------------------------


async def test_endless_body_is_cut_at_max_bytes(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("endless")
    async with asyncio.timeout(WAIT):
        with pytest.raises(DownloadError, match="max_bytes=1000000") as caught:
            await client.download(task.image_urls[0], tmp_path, max_bytes=1_000_000)
    assert caught.value.status == 200
    assert len(server.image_requests) == 1  # a refusal, not retried
    assert leftovers(tmp_path) == []


async def test_endless_body_is_cut_at_64_mib_by_default(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    assert DEFAULT_MAX_BYTES == 64 * 1024 * 1024
    task = await finished(client, server)
    server.inject_image("endless", times=2)
    async with asyncio.timeout(30):
        with pytest.raises(DownloadError, match=f"max_bytes={DEFAULT_MAX_BYTES}"):
            await client.download_all(task, tmp_path)
    assert len(server.image_requests) == 1
    assert leftovers(tmp_path) == []


async def test_announced_length_over_max_bytes_is_refused_before_reading(
    client: NanoBananaClient, hostile: str, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match="1000000000 bytes, more than max_bytes"):
        await client.download(f"{hostile}/huge", tmp_path)
    assert leftovers(tmp_path) == []


async def test_max_bytes_must_be_a_positive_integer(
    client: NanoBananaClient, tmp_path: Path
) -> None:
    for bad in (0, -1, True, 1.5, "64"):
        with pytest.raises(ValueError, match="max_bytes"):
            await client.download("http://localhost/a.png", tmp_path, max_bytes=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="max_bytes"):
            await client.download_all(["http://localhost/a.png"], tmp_path, max_bytes=bad)  # type: ignore[arg-type]


async def test_a_dripping_body_is_bounded_by_the_client_timeout(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    # Each byte comes well within the timeout; the whole image would take seconds.
    async with make_client(timeout=0.5, retry=RetryPolicy.no_wait(max_retries=1)) as client:
        task = await finished(client, server)
        server.inject_image("drip", times=2, delay=0.1)
        async with asyncio.timeout(WAIT):
            with pytest.raises(APITimeoutError, match=r"did not finish within 0\.5 s"):
                await client.download(task.image_urls[0], tmp_path)
    assert len(server.image_requests) == 2  # a timeout is worth one more attempt
    assert leftovers(tmp_path) == []


# --- 12: redirects -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location",
    [
        "http://169.254.169.254/latest/meta-data/iam?token=" + SECRET,
        "http://2852039166/latest/meta-data/",  # 169.254.169.254, as one number
        "http://0xa9.0xfe.0xa9.0xfe/",
        "http://[::ffff:169.254.169.254]/",
        "http://[fe80::1]/",
        "http://0.0.0.0:9/",
    ],
)
async def test_redirect_to_link_local_is_never_followed(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path, location: str
) -> None:
    async with make_client(retry=RetryPolicy.no_wait(max_retries=2)) as client:
        task = await finished(client, server)
        server.inject_image("redirect", location=location)
        async with asyncio.timeout(WAIT):
            with pytest.raises(DownloadError, match="link-local") as caught:
                await client.download(task.image_urls[0], tmp_path)
    assert len(server.image_requests) == 1  # a refusal, not retried
    assert SECRET not in rendered(caught.value)
    assert leftovers(tmp_path) == []


async def test_image_url_on_link_local_is_refused_without_a_request(
    client: NanoBananaClient, tmp_path: Path
) -> None:
    async with asyncio.timeout(WAIT):
        with pytest.raises(DownloadError, match="link-local") as caught:
            await client.download(f"http://169.254.169.254/x.png?sig={SECRET}", tmp_path)
    assert caught.value.status is None
    assert SECRET not in str(caught.value)


async def test_redirect_loop_is_not_retried_and_hides_the_query(
    make_client: MakeClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    async with make_client(retry=RetryPolicy.no_wait(max_retries=1)) as client:
        task = await finished(client, server)
        server.inject_image("redirect", times=100)  # every request points to itself
        url = f"{task.image_urls[0]}?sig={SECRET}"
        async with asyncio.timeout(WAIT):
            with pytest.raises(DownloadError, match="redirected more than 5 times") as caught:
                await client.download(url, tmp_path)
    assert len(server.image_requests) == 6  # the image URL and 5 redirects, once
    assert caught.value.url == url
    assert SECRET not in rendered(caught.value)
    assert leftovers(tmp_path) == []


async def test_redirects_between_loopback_hosts_are_followed(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    first, second = (await finished(client, server)), (await finished(client, server))
    # Absolute, to another loopback host name, then relative.
    other = second.image_urls[0].replace("localhost", "127.0.0.1")
    server.inject_image("redirect", location=other)
    path = await client.download(first.image_urls[0], tmp_path)
    assert path.name == f"{first.id}_0.png"  # named after the URL asked for
    server.inject_image("redirect", location=URL(second.image_urls[0]).path)
    again = await client.download(first.image_urls[0], tmp_path / "again.png")
    hops = [URL(first.image_urls[0]).path, URL(second.image_urls[0]).path]
    assert [p for p, _ in server.image_requests] == hops * 2
    assert path.read_bytes() == again.read_bytes() == await fetch(second.image_urls[0])


async def fetch(url: str) -> bytes:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return await response.read()


async def test_redirect_to_another_scheme_is_refused(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("redirect", location="file:///etc/passwd")
    with pytest.raises(DownloadError, match="not an http"):
        await client.download(task.image_urls[0], tmp_path)
    assert len(server.image_requests) == 1


async def test_redirect_from_public_to_private_needs_a_private_image_url() -> None:
    # The rule itself, on literal addresses: loopback cannot host a "public" image URL.
    public, loopback = "http://93.184.216.34/a.png", "http://127.0.0.1/a.png"
    for hop in ("http://10.0.0.5/admin", "http://127.0.0.1:8080/", "http://localhost/x"):
        with pytest.raises(DownloadError, match="private address"):
            await _check_redirect(URL(hop), public, None)
        assert await _check_redirect(URL(hop), loopback, None) is True
    assert await _check_redirect(URL("http://93.184.216.35/b.png"), public, None) is None
    with pytest.raises(DownloadError, match="link-local"):
        await _check_redirect(URL("http://169.254.169.254/"), loopback, True)


async def test_query_never_appears_in_messages(
    make_client: MakeClient, server: FakeNanoBanana, hostile: str, tmp_path: Path
) -> None:
    async with make_client(retry=RetryPolicy.no_wait(max_retries=0)) as client:
        task = await finished(client, server)
        urls = [
            task.image_urls[0].replace("/0.png", "/9.png"),  # 404
            f"{hostile}/svg-as-png",  # not an image
            "http://127.0.0.1:9/a.png",  # connection refused (discard port)
            "http://user:" + SECRET + "@127.0.0.1:9/a.png",
        ]
        server.inject_image("truncate")
        urls.insert(0, task.image_urls[0])  # cut short
        for url in urls:
            with pytest.raises(NanoBananaError) as caught:
                await client.download(f"{url}?sig={SECRET}&x=1", tmp_path)
            assert SECRET not in rendered(caught.value), url
    assert leftovers(tmp_path) == []


def test_hosts_on_link_local_in_any_spelling_are_forbidden() -> None:
    for host in ("169.254.169.254", "2852039166", "0xa9fea9fe", "0251.0376.0251.0376",
                 "169.254.43518", "fe80::1", "::ffff:a9fe:a9fe", "64:ff9b::a9fe:a9fe",
                 "0.0.0.0", "::", "224.0.0.1"):  # fmt: skip
        assert reach_of_host(host) is Reach.FORBIDDEN, host
    for host in ("127.0.0.1", "127.1", "::1", "localhost", "LOCALHOST.", "img.localhost",
                 "10.1.2.3", "192.168.0.1", "172.16.0.1", "100.64.0.1", "fc00::1"):  # fmt: skip
        assert reach_of_host(host) is Reach.PRIVATE, host
    for host in ("93.184.216.34", "2606:2800:220:1::1"):
        assert reach_of_host(host) is Reach.PUBLIC, host
    for host in ("cdn.example.com", "cafe", "0xdeadbeef.example"):
        assert reach_of_host(host) is None, host


@given(st.integers(min_value=0, max_value=0xFFFF))
def test_every_spelling_of_a_link_local_ipv4_is_forbidden(low: int) -> None:
    address = (169 << 24) | (254 << 16) | low
    for host in (str(address), hex(address), f"169.254.{low}", f"0251.0376.{low >> 8}.{low & 255}"):
        assert reach_of_host(host) is Reach.FORBIDDEN, host


async def test_own_session_never_resolves_a_name_to_link_local() -> None:
    resolver = GuardedResolver()
    with pytest.raises(OSError, match="link-local"):
        await resolver.resolve("0xa9fea9fe", 80)  # the C library reads it as 169.254.169.254
    assert {r["host"] for r in await resolver.resolve("127.1", 80)} == {"127.0.0.1"}
    await resolver.close()
    # Through aiohttp's own connector: the name is refused before any connection.
    async with aiohttp.ClientSession(connector=guarded_connector()) as session:
        with pytest.raises(aiohttp.ClientConnectorError, match="link-local"):
            await session.get("http://0xa9fea9fe/latest/meta-data/")


# --- 13: cookies ---------------------------------------------------------------------------


async def test_image_host_cookies_reach_neither_it_again_nor_the_api(
    server: FakeNanoBanana, tmp_path: Path
) -> None:
    api_headers: list[dict[str, str]] = []

    async def tasks(request: web.Request) -> web.Response:
        api_headers.append(dict(request.headers))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/nano-banana/tasks", tasks)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        # The API and the image host share a host name, as a CDN on the API's domain would.
        base_url = f"http://localhost:{runner.addresses[0][1]}"
        async with NanoBananaClient(server.token, base_url=base_url, timeout=WAIT) as client:
            url = server.tasks[server.add_task(duration=0)].image_urls[0]
            server.inject_image("set_cookie")
            await client.download(url, tmp_path / "a.png")
            await client.download(url, tmp_path / "b.png")
            with pytest.raises(TaskNotFoundError):
                await client.retrieve("some-task")
    finally:
        await runner.cleanup()
    _, second = (headers for _, headers in server.image_requests)
    assert "cookie" not in {name.lower() for name in second}
    assert api_headers
    assert "cookie" not in {name.lower() for name in api_headers[0]}


# --- 14: what is written, and how ----------------------------------------------------------


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test, restoring it afterwards."""
    old = os.umask(0o022)
    os.umask(old)

    def set_umask(mask: int) -> None:
        os.umask(mask)

    try:
        yield set_umask
    finally:
        os.umask(old)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
async def test_saved_files_follow_the_umask(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path, umask: Callable[[int], None]
) -> None:
    task = await finished(client, server)
    umask(0o022)
    shared = await client.download(task.image_urls[0], tmp_path / "shared.png")
    umask(0o077)
    private = await client.download(task.image_urls[0], tmp_path / "private.png")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600


async def test_svg_is_never_saved(
    client: NanoBananaClient, server: FakeNanoBanana, hostile: str, tmp_path: Path
) -> None:
    task = await finished(client, server)
    server.inject_image("svg")
    with pytest.raises(
        DownloadError, match="not a PNG, JPEG, WebP, GIF, AVIF, HEIC or HEIF"
    ) as caught:
        await client.download(task.image_urls[0], tmp_path)
    assert caught.value.status == 200
    assert len(server.image_requests) == 1
    with pytest.raises(DownloadError, match="not a PNG"):
        await client.download(f"{hostile}/svg-as-png", tmp_path)  # whatever the label says
    assert leftovers(tmp_path) == []


async def test_extension_comes_from_the_bytes(
    client: NanoBananaClient, hostile: str, tmp_path: Path
) -> None:
    assert (await client.download(f"{hostile}/png-as-jpeg", tmp_path)).name == "png-as-jpeg.png"
    assert (await client.download(f"{hostile}/octet", tmp_path)).name == "octet.png"
    samples = {
        "gif": b"GIF89a\x01\x00\x01\x00",
        "webp": b"RIFF\x24\x00\x00\x00WEBPVP8 ",
        "avif": b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00avifmif1miaf",
        "heic": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic",
    }
    for kind, head in samples.items():
        path = await client.download(f"{hostile}/bytes/{head.hex()}", f"{tmp_path}/{kind}/")
        assert path.suffix == f".{kind}"


async def test_encoded_bodies_are_refused(
    client: NanoBananaClient, hostile: str, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match="Content-Encoding 'gzip'"):
        await client.download(f"{hostile}/gzip", tmp_path)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("head", "extension"),
    [
        (PNG, ".png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", ".jpg"),
        (b"GIF87a", ".gif"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8L", ".webp"),
        (b"\x00\x00\x00\x1cftypavis\x00\x00\x00\x00avismsf1", ".avif"),
        (b"\x00\x00\x00\x18ftypheix\x00\x00\x00\x00mif1", ".heic"),
        (b"\x00\x00\x00\x18ftypmif1\x00\x00\x00\x00heic", ".heic"),
        (b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1miafavif", ".avif"),
        (b"\x00\x00\x00\x14ftypmif1\x00\x00\x00\x00", ".heif"),
        (b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isom", None),  # an MP4 video
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b'<?xml version="1.0"?><svg', None),
        (b"<svg><script>", None),
        (b"<!DOCTYPE html>", None),
        (b"\x1f\x8b\x08\x00", None),  # gzip
        (b"PK\x03\x04", None),
        (b"", None),
    ],
)
def test_image_extension_from_magic_bytes(head: bytes, extension: str | None) -> None:
    assert image_extension(head) == extension


@pytest.mark.parametrize(
    ("name", "stem"),
    [
        ("CON.png", "_CON"),
        ("nul.png", "_nul"),
        ("Com1.jpg", "_Com1"),
        ("lpt9", "_lpt9"),
        ("aux.tar.png", "_aux.tar"),
        ("-rf.png", "rf"),
        ("--help", "help"),
        ("-.png", None),
        ("console.png", "console"),
    ],
)
async def test_file_names_are_safe_on_every_system(
    client: NanoBananaClient, hostile: str, tmp_path: Path, name: str, stem: str | None
) -> None:
    path = await client.download(f"{hostile}/name/{name}", tmp_path)
    if stem is None:  # nothing usable left: a hash of the URL
        assert len(path.stem) == 16
    else:
        assert path.stem == stem
    assert path.suffix == ".png"


# Letters that spell devices, dashes and dots that lead, and some the sanitizer replaces.
@given(st.text(alphabet="-._ cCoOnNuUlLpPrRaAxXmMtT0129é?/", min_size=1, max_size=12))
def test_stems_never_start_with_a_dash_or_dot_nor_name_a_device(segment: str) -> None:
    url = "http://cdn.example/img/" + urllib.parse.quote(segment, safe="")
    stem = _stem_for(url)
    assert stem
    assert not stem.startswith(("-", "."))
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in stem)
    device = stem.split(".")[0].lower()
    assert device not in {"con", "prn", "aux", "nul"}
    assert not (device[:3] in ("com", "lpt") and device[3:].isdigit() and len(device) == 4)


async def test_a_folder_that_cannot_be_made_is_a_download_error(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file, not a folder")
    with pytest.raises(DownloadError, match="cannot create the folder") as caught:
        await client.download(task.image_urls[0], blocker / "sub" / "x.png")
    assert caught.value.status is None
    assert not isinstance(caught.value, OSError)


async def test_a_failed_rename_is_a_download_error_and_leaves_no_part(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    task = await finished(client, server)
    (tmp_path / f"{task.id}_0.png").mkdir()  # the name is taken by a non-empty folder
    (tmp_path / f"{task.id}_0.png" / "keep").write_text("x")
    with pytest.raises(DownloadError, match="cannot save") as caught:
        await client.download(task.image_urls[0], tmp_path)
    assert not isinstance(caught.value, APIConnectionError)
    assert leftovers(tmp_path) == [f"{task.id}_0.png"]


async def test_a_stem_names_the_file_and_the_bytes_its_extension(
    make_client: MakeClient, hostile: str, tmp_path: Path
) -> None:
    # A PNG served under a .jpg name: the file is named by what it is.
    async with make_client() as client:
        path = await client.download(f"{hostile}/name/photo.jpg", tmp_path, stem="cat-0")
        assert path == tmp_path / "cat-0.png"
        assert path.read_bytes().startswith(b"\x89PNG")
        reserved = await client.download(f"{hostile}/name/x.png", tmp_path, stem="nul")
        assert reserved.name == "_nul.png"
        escaped = await client.download(f"{hostile}/name/x.png", tmp_path, stem="../../up")
        assert escaped.parent == tmp_path  # never out of the folder
        with pytest.raises(ValueError, match="stem"):
            await client.download(f"{hostile}/name/x.png", tmp_path, stem="...")
