"""Local images for ``edit``: paths and bytes become data: URLs, checked before any request."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nanobanana_async import NanoBananaClient
from nanobanana_async._images import MAX_IMAGE_URL_BYTES, image_url, image_urls
from nanobanana_async.testing import FakeNanoBanana, make_png

MAGIC = {
    "image/png": b"\x89PNG\r\n\x1a\n",
    "image/jpeg": b"\xff\xd8\xff\xe0",
    "image/gif": b"GIF89a",
    "image/webp": b"RIFF\x10\x00\x00\x00WEBP",
}


def decoded(url: str, mime: str) -> bytes:
    prefix = f"data:{mime};base64,"
    assert url.startswith(prefix)
    return base64.b64decode(url[len(prefix) :], validate=True)


@given(mime=st.sampled_from(sorted(MAGIC)), tail=st.binary(max_size=200))
def test_bytes_become_a_data_url_of_the_sniffed_type(mime: str, tail: bytes) -> None:
    data = MAGIC[mime] + tail
    assert decoded(image_url(data), mime) == data
    assert decoded(image_url(bytearray(data)), mime) == data


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/a.png",
        "http://example.com/a.png",
        "HTTPS://EXAMPLE.COM/A.PNG",
        "data:image/png;base64,iVBORw0KGgo=",
    ],
)
def test_urls_pass_as_they_are(url: str) -> None:
    assert image_url(url) is url


def test_the_file_type_comes_from_its_bytes_not_its_name(tmp_path: Path) -> None:
    liar = tmp_path / "photo.jpg"
    liar.write_bytes(make_png(3, 3))
    assert decoded(image_url(liar), "image/png") == make_png(3, 3)
    assert decoded(image_url(str(liar)), "image/png") == make_png(3, 3)


def test_a_file_that_is_not_an_image_is_refused_by_name(tmp_path: Path) -> None:
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    with pytest.raises(ValueError, match=r"not an image .*notes\.png"):
        image_url(notes)
    with pytest.raises(ValueError, match=r"not an image .*image_urls\[1\] \(3 bytes\)"):
        image_url(b"abc", name="image_urls[1]")


def test_a_missing_file_names_itself_and_the_accepted_forms(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"image file not found.*URL") as caught:
        image_url(tmp_path / "nope.png")
    assert caught.value.errno == errno.ENOENT
    assert caught.value.filename == str(tmp_path / "nope.png")


def test_other_types_are_refused() -> None:
    with pytest.raises(ValueError, match=r"image must be a URL, a file path or bytes, got int"):
        image_url(42)  # type: ignore[arg-type]


def test_the_limit_counts_the_encoded_url_to_the_byte() -> None:
    header = len("data:image/png;base64,")
    fits = (MAX_IMAGE_URL_BYTES - header) // 4 * 3
    largest = MAGIC["image/png"] + bytes(fits - len(MAGIC["image/png"]))
    assert len(image_url(largest)) <= MAX_IMAGE_URL_BYTES
    with pytest.raises(ValueError, match=r"image too large: image \(\d+ bytes\)"):
        image_url(largest + b"\x00")


def test_a_large_file_is_refused_before_it_is_read(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    with big.open("wb") as file:
        file.write(make_png())
        file.truncate(9 * 1024 * 1024)  # sparse: large on paper, cheap on disk
    with pytest.raises(ValueError, match=r"image too large: .*big\.png is 9\.4 MB"):
        image_url(big)


def test_a_data_url_over_the_limit_is_refused() -> None:
    with pytest.raises(ValueError, match=r"image_urls\[0\] is a URL of 10\.5 MB"):
        image_url("data:" + "x" * MAX_IMAGE_URL_BYTES, name="image_urls[0]")


@pytest.mark.parametrize("single", ["https://example.com/a.png", b"\x89PNG", Path("a.png"), None])
async def test_one_image_instead_of_a_list_is_refused(single: object) -> None:
    with pytest.raises(ValueError, match="image_urls must be a list"):
        await image_urls(single)  # type: ignore[arg-type]


async def test_edit_sends_paths_and_bytes_as_data_urls(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    picture = tmp_path / "in.png"
    picture.write_bytes(make_png(4, 4))
    jpeg = MAGIC["image/jpeg"] + b"rest of a jpeg"
    submission = await client.edit(
        "make it blue", [picture, str(picture), jpeg, "https://example.com/b.jpg"]
    )
    sent = server.tasks[submission.task_id].request["image_urls"]
    assert decoded(sent[0], "image/png") == make_png(4, 4)
    assert sent[1] == sent[0]
    assert decoded(sent[2], "image/jpeg") == jpeg
    assert sent[3] == "https://example.com/b.jpg"


async def test_edit_checks_every_image_before_any_request(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    big = tmp_path / "big.webp"
    with big.open("wb") as file:
        file.write(MAGIC["image/webp"])
        file.truncate(8 * 1024 * 1024)
    with pytest.raises(ValueError, match=r"image too large: .*big\.webp"):
        await client.edit("x", ["https://example.com/a.png", big])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        await client.edit("x", [tmp_path / "missing.png"])
    assert not server.counts


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
async def test_edit_reads_files_off_the_event_loop(
    client: NanoBananaClient, server: FakeNanoBanana, tmp_path: Path
) -> None:
    """A named pipe blocks its reader until this loop writes into it: if ``edit`` read on
    the loop, the loop would stall, and the watchdog would end the read with an empty
    pipe (not an image) instead of a hang."""
    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)

    def unblock() -> None:
        with contextlib.suppress(OSError):  # ENXIO: nobody is reading, nothing to unblock
            os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))

    watchdog = threading.Timer(10.0, unblock)
    watchdog.daemon = True
    watchdog.start()
    try:
        editing = asyncio.create_task(client.edit("x", [pipe]))
        writer = None
        while writer is None and not editing.done():  # the read has begun once it has a reader
            try:
                writer = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                await asyncio.sleep(0.01)
        assert writer is not None, f"the event loop stalled on the read: {editing.exception()!r}"
        os.write(writer, make_png(2, 2))
        os.close(writer)
        async with asyncio.timeout(10.0):
            submission = await editing
    finally:
        watchdog.cancel()
    sent = server.tasks[submission.task_id].request["image_urls"]
    assert decoded(sent[0], "image/png") == make_png(2, 2)
