"""Images as the API takes them: URLs pass as they are, a local file or raw bytes become a
``data:`` URL, and every entry is checked against the API's 10 MB limit before any request.

The client's ``edit`` and the command line's ``--image`` both go through here.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Final, TypeAlias

from ._sniff import SNIFF_BYTES, image_extension

__all__ = ["MAX_IMAGE_URL_BYTES", "ImageInput", "image_url", "image_urls"]

#: The API takes each entry of ``image_urls`` up to 10 MB, a ``data:`` URL included.
MAX_IMAGE_URL_BYTES: Final = 10 * 1024 * 1024

#: What ``edit`` accepts per image: an http(s) or ``data:`` URL, a file path, or the bytes.
ImageInput: TypeAlias = str | os.PathLike[str] | bytes

_URL_PREFIXES: Final = ("http://", "https://", "data:")
_SNIFF_BYTES: Final = SNIFF_BYTES
_KINDS: Final = "PNG, JPEG, WebP or GIF"


def image_url(image: ImageInput, *, name: str = "image") -> str:
    """One image as the API takes it; ``name`` says which entry it is in error messages.

    Reads the file of a path, so call it off the event loop (``image_urls`` does).
    A missing or unreadable file raises the ``OSError`` of the read; an entry that
    is not a PNG, JPEG, WebP or GIF image, or too large for the API, a ``ValueError``
    naming the file.
    """
    if isinstance(image, str) and _is_url(image):
        if len(image) > MAX_IMAGE_URL_BYTES:
            raise ValueError(
                f"{name} is a URL of {len(image) / 1e6:.1f} MB; the API takes entries up to 10 MB"
            )
        return image
    if isinstance(image, bytes | bytearray):
        data = bytes(image)
        shown = f"{name} ({len(data)} bytes)"
        mime = _mime_type(data[:_SNIFF_BYTES], shown)
        _check_size(mime, len(data), shown)
        return _data_url(mime, data)
    if isinstance(image, str | os.PathLike):
        return _file_data_url(Path(os.fsdecode(image)).expanduser())
    raise ValueError(f"{name} must be a URL, a file path or bytes, got {type(image).__name__}")


async def image_urls(images: Iterable[ImageInput]) -> list[str]:
    """Every entry of ``edit``'s ``image_urls`` as the API takes it, in order.

    Files are read (and bytes encoded) in a worker thread, never on the event loop; a
    list of URLs alone costs no thread.
    """
    if images is None or isinstance(images, str | bytes | bytearray | os.PathLike):
        raise ValueError(
            "image_urls must be a list of images (URLs, file paths or bytes), "
            f"got {type(images).__name__}"
        )
    entries = list(images)

    def convert() -> list[str]:
        return [image_url(entry, name=f"image_urls[{i}]") for i, entry in enumerate(entries)]

    if all(isinstance(entry, str) and _is_url(entry) for entry in entries):
        return convert()
    return await asyncio.to_thread(convert)


def _is_url(value: str) -> bool:
    return value[:8].lower().startswith(_URL_PREFIXES)


def _file_data_url(path: Path) -> str:
    try:
        file = path.open("rb")
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            exc.errno,
            "image file not found (an image is an http(s) or data: URL, a file path or bytes)",
            str(path),
        ) from None
    with file:
        head = file.read(_SNIFF_BYTES)
        mime = _mime_type(head, str(path))
        # Refuse before reading the rest: a file too large for the API is never loaded;
        # and read at most one byte past the limit, for files whose size is not known
        # beforehand (pipes, devices).
        _check_size(mime, os.fstat(file.fileno()).st_size, str(path))
        data = head + file.read(_largest(mime) + 1 - len(head))
        _check_size(mime, len(data), str(path))
    return _data_url(mime, data)


# The kinds of image the API takes inline, by the extension ``_sniff`` reads off the bytes.
_MIME_TYPES: Final = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".gif": "image/gif",
    ".webp": "image/webp",
}


def _mime_type(head: bytes, shown: str) -> str:
    """The image type from its first bytes; a file name's extension can lie."""
    mime = _MIME_TYPES.get(image_extension(head) or "")
    if mime is None:
        raise ValueError(f"not an image ({_KINDS} expected): {shown}")
    return mime


def _check_size(mime: str, size: int, shown: str) -> None:
    # base64 turns every 3 bytes into 4 characters, after the "data:...;base64," header.
    encoded = len(_header(mime)) + 4 * ((size + 2) // 3)
    if encoded > MAX_IMAGE_URL_BYTES:
        raise ValueError(
            f"image too large: {shown} is {size / 1e6:.1f} MB; the API takes images up to "
            f"10 MB as data: URLs (about {_largest(mime) / 1e6:.1f} MB of file); upload it "
            "somewhere and pass its URL instead"
        )


def _largest(mime: str) -> int:
    """The most bytes of a ``mime`` image that fit the limit once encoded."""
    return (MAX_IMAGE_URL_BYTES - len(_header(mime))) // 4 * 3


def _header(mime: str) -> str:
    return f"data:{mime};base64,"


def _data_url(mime: str, data: bytes) -> str:
    return _header(mime) + base64.b64encode(data).decode("ascii")
