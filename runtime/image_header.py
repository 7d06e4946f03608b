"""Image dimensions read from the file header, before anything is decoded.

A 70-byte PNG may declare 50000x50000 pixels: decoding it would allocate gigabytes (OpenCV
refuses above its own limit with an exception). Reading the size from the header costs
microseconds and lets the caller refuse such a file with a limit of its own.

Written here rather than with Pillow: the edge install does not otherwise need Pillow, and
these headers are fixed fields a few lines each (PNG IHDR, JPEG SOFn, GIF logical screen,
BMP info header, TIFF first IFD, WebP VP8/VP8L/VP8X).
"""

from __future__ import annotations

import struct

# 100 megapixels: a 50 MP line camera fits twice; decoding takes up to 8 bytes a pixel (16-bit RGBA).
DEFAULT_MAX_PIXELS = 100_000_000
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WebP")
# Start-of-frame markers (SOF0-SOF15 less DHT, JPG and DAC) and markers that stand without a length.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


class HeaderError(ValueError):
    """The data is not one of FORMATS, or its header is cut short or inconsistent."""


def _unpack(fmt: str, data: bytes, offset: int, what: str) -> tuple:
    try:
        return struct.unpack_from(fmt, data, offset)
    except struct.error:
        raise HeaderError(f"{what} header cut short ({len(data)} bytes)") from None


def _png(data: bytes) -> tuple[int, int]:
    length, kind, width, height = _unpack(">I4sII", data, 8, "PNG")
    if kind != b"IHDR" or length != 13:
        raise HeaderError("PNG without an IHDR chunk first")
    return width, height


def _jpeg(data: bytes) -> tuple[int, int]:
    at = 2
    while True:
        prefix, marker = _unpack(">BB", data, at, "JPEG")
        if prefix != 0xFF:
            raise HeaderError(f"JPEG marker expected at byte {at}")
        if marker == 0xFF:  # fill byte before a marker
            at += 1
        elif marker in _JPEG_STANDALONE:
            at += 2
        elif marker in (0xD9, 0xDA):
            raise HeaderError("JPEG image data (or its end) before any frame header")
        elif marker in _JPEG_SOF:
            height, width = _unpack(">HH", data, at + 5, "JPEG")
            return width, height
        else:
            at += 2 + _unpack(">H", data, at + 2, "JPEG")[0]


def _bmp(data: bytes) -> tuple[int, int]:
    (info_size,) = _unpack("<I", data, 14, "BMP")
    if info_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        return _unpack("<HH", data, 18, "BMP")
    width, height = _unpack("<ii", data, 18, "BMP")
    return abs(width), abs(height)  # a negative height is a top-down bitmap


def _tiff(data: bytes) -> tuple[int, int]:
    order = "<" if data[:2] == b"II" else ">"
    (version,) = _unpack(order + "H", data, 2, "TIFF")
    # Classic TIFF: 32-bit offsets, 12-byte entries; BigTIFF (43): 64-bit offsets, 20-byte entries.
    offset_fmt, count_fmt, entry_size, value_at = ("I", "H", 12, 8) if version == 42 else ("Q", "Q", 20, 12)
    (ifd,) = _unpack(order + offset_fmt, data, 4 if version == 42 else 8, "TIFF")
    (count,) = _unpack(order + count_fmt, data, ifd, "TIFF")
    first = ifd + struct.calcsize(count_fmt)
    value_fmts = {3: "H", 4: "I", 16: "Q"}  # SHORT, LONG, LONG8
    size: dict[int, int] = {}
    for entry in range(min(count, max(0, len(data) - first) // entry_size)):
        at = first + entry * entry_size
        tag, kind = _unpack(order + "HH", data, at, "TIFF")
        if tag in (256, 257) and kind in value_fmts:  # ImageWidth, ImageLength
            size[tag] = _unpack(order + value_fmts[kind], data, at + value_at, "TIFF")[0]
    if len(size) != 2:
        raise HeaderError("TIFF whose first directory has no image width and length")
    return size[256], size[257]


def _webp(data: bytes) -> tuple[int, int]:
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":
            raise HeaderError("WebP VP8 frame without its start code")
        width, height = _unpack("<HH", data, 26, "WebP")
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L":
        signature, bits = _unpack("<BI", data, 20, "WebP")
        if signature != 0x2F:
            raise HeaderError("WebP lossless frame without its signature")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8X":
        low_w, high_w, low_h, high_h = _unpack("<HBHB", data, 24, "WebP")
        return (low_w | high_w << 16) + 1, (low_h | high_h << 16) + 1
    raise HeaderError(f"WebP with an unknown first chunk {chunk!r}")


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG", _png),
    (b"\xff\xd8", "JPEG", _jpeg),
    (b"GIF87a", "GIF", lambda data: _unpack("<HH", data, 6, "GIF")),
    (b"GIF89a", "GIF", lambda data: _unpack("<HH", data, 6, "GIF")),
    (b"BM", "BMP", _bmp),
    (b"II*\x00", "TIFF", _tiff),
    (b"MM\x00*", "TIFF", _tiff),
    (b"II+\x00", "TIFF", _tiff),
    (b"MM\x00+", "TIFF", _tiff),
)


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) declared by the header of an encoded image.

    Raises HeaderError when the data is none of FORMATS or its header is cut short.
    """
    for signature, name, parse in _SIGNATURES:
        if data.startswith(signature):
            width, height = parse(data)
            return name, width, height
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ("WebP", *_webp(data))
    raise HeaderError(f"not an image in a known format ({', '.join(FORMATS)})")
