"""What kind of raster image a body is, from its first bytes; None for anything else.

A download is saved only when its bytes are a PNG, JPEG, WebP, GIF, AVIF or HEIC/HEIF
image, and named with the extension of what the bytes are, whatever the answer's
``Content-Type`` claims: an SVG (which can carry scripts), an HTML page or an archive
is never saved, whatever its header says.
"""

from __future__ import annotations

from typing import Final

__all__ = ["SNIFF_BYTES", "image_extension"]

#: Enough for every signature below, an ISO-BMFF ``ftyp`` box with four brands included.
SNIFF_BYTES: Final = 32

_AVIF_BRANDS: Final = frozenset({b"avif", b"avis"})
_HEIC_BRANDS: Final = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
_HEIF_BRANDS: Final = frozenset({b"mif1", b"msf1"})


def image_extension(head: bytes) -> str | None:
    """``.png``, ``.jpg``, ``.webp``, ``.gif``, ``.avif``, ``.heic`` or ``.heif``, else None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return ".png"
    if head.startswith(b"\xff\xd8\xff"):
        return ".jpg"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return ".gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return ".webp"
    if head[4:8] == b"ftyp":
        return _heif_extension(head)
    return None


def _heif_extension(head: bytes) -> str | None:
    """The extension an ISO-BMFF file's brands stand for, if it is an AVIF or HEIF image."""
    size = int.from_bytes(head[:4], "big")
    # The major brand, then (after a 4-byte minor version) the compatible brands.
    end = min(size, len(head)) if size >= 16 else 12
    brands = [head[8:12]] + [head[i : i + 4] for i in range(16, end - 3, 4)]
    major = brands[0]
    if major in _AVIF_BRANDS:
        return ".avif"
    if major in _HEIC_BRANDS:
        return ".heic"
    if major not in _HEIF_BRANDS:
        return None  # an MP4 video, a QuickTime movie, a JPEG 2000 ...
    if any(brand in _AVIF_BRANDS for brand in brands):
        return ".avif"
    if any(brand in _HEIC_BRANDS for brand in brands):
        return ".heic"
    return ".heif"
