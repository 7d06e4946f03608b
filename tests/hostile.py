"""Hostile image files, as a line's folder or camera may deliver them: headers that lie about the size, a real
decompression bomb, truncated, empty and mislabelled files, and the odd pixel formats (16-bit, CMYK, palette,
animated) a decoder must cope with. Written with OpenCV, Pillow and by hand (TIFF)."""

from __future__ import annotations

import io
import struct
import zlib

import cv2
import numpy as np
from PIL import Image

HUGE = 50_000  # each side of the lying headers: 2.5 gigapixels


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def lying_png(width: int = HUGE, height: int = HUGE) -> bytes:
    """The issue's file: 69 bytes, a valid PNG structure (CRCs right) whose IHDR declares width x height."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
            + _png_chunk(b"IEND", b""))


def tiff(width: int, height: int, pixels: bytes, order: str = "<") -> bytes:
    """A minimal uncompressed 8-bit grey TIFF, little- ("<", II) or big-endian (">", MM), as written by hand."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, len(pixels))]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    entries = b""
    for tag, kind, value in tags:
        value = data_at if tag == 273 else value
        field = struct.pack(order + ("HH" if kind == 3 else "I"), *((value, 0) if kind == 3 else (value,)))
        entries += struct.pack(order + "HHI", tag, kind, 1) + field
    magic = b"II*\x00" if order == "<" else b"MM\x00*"
    return magic + struct.pack(order + "I", ifd_at) + struct.pack(order + "H", len(tags)) + entries + b"\0\0\0\0" + pixels


def bomb_png(side: int = 12_000) -> bytes:
    """A real decompression bomb: a grey side x side PNG of zeros, some 150 kB, compressed row by row."""
    compressor = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte + pixels
    data = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def encode(image: np.ndarray, suffix: str, *params: int) -> bytes:
    """RGB (or grey) pixels encoded by OpenCV."""
    bgr = image[..., ::-1] if image.ndim == 3 else image
    ok, data = cv2.imencode(suffix, np.ascontiguousarray(bgr), list(params))
    assert ok, suffix
    return data.tobytes()


def _pil(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def lying(rgb: np.ndarray) -> dict[str, bytes]:
    """A real file of each format whose header was changed to declare HUGE x HUGE (WebP: its 14-bit maximum)."""
    png = bytearray(encode(rgb, ".png"))
    png[16:24] = struct.pack(">II", HUGE, HUGE)
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))
    jpeg = bytearray(encode(rgb, ".jpg"))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5 : sof + 9] = struct.pack(">HH", HUGE, HUGE)
    gif = bytearray(_pil(Image.fromarray(rgb), "GIF"))
    gif[6:10] = struct.pack("<HH", HUGE, HUGE)
    bmp = bytearray(encode(rgb, ".bmp"))
    bmp[18:26] = struct.pack("<ii", HUGE, -HUGE)  # negative: a top-down bitmap
    webp = bytearray(encode(rgb, ".webp", cv2.IMWRITE_WEBP_QUALITY, 90))
    assert webp[12:16] == b"VP8 "
    webp[26:30] = struct.pack("<HH", 0x3FFF, 0x3FFF)
    lossless = bytearray(encode(rgb, ".webp", cv2.IMWRITE_WEBP_QUALITY, 101))
    assert lossless[12:16] == b"VP8L"
    lossless[21:25] = struct.pack("<I", 0x3FFF | 0x3FFF << 14)
    return {"lying.png": bytes(png), "lying-issue.png": lying_png(), "lying.jpg": bytes(jpeg),
            "lying.gif": bytes(gif), "lying.bmp": bytes(bmp), "lying-ii.tif": tiff(HUGE, HUGE, b"\0" * 64),
            "lying-mm.tif": tiff(HUGE, HUGE, b"\0" * 64, ">"), "lying.webp": bytes(webp),
            "lying-lossless.webp": bytes(lossless)}


def corpus(rgb: np.ndarray) -> tuple[dict[str, bytes], set[str]]:
    """(name → bytes, the names a decoder can make a frame of); every other file must be refused by name."""
    png, jpeg = encode(rgb, ".png"), encode(rgb, ".jpg")
    frames = [Image.fromarray(np.roll(rgb, 8 * i, axis=1)) for i in range(3)]
    usable = {
        "good.png": png,
        "good.jpg": jpeg,
        "jpeg-named.png": jpeg,  # wrong extension: decoded by content
        "deep.png": encode(rgb.astype(np.uint16) * 257, ".png"),
        "deep.tif": encode(rgb.astype(np.uint16) * 257, ".tiff"),
        "cmyk.jpg": _pil(Image.fromarray(rgb).convert("CMYK"), "JPEG"),
        "palette.png": _pil(Image.fromarray(rgb).convert("P"), "PNG"),
        "animated.gif": _pil(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "animated.png": _pil(frames[0], "PNG", save_all=True, append_images=frames[1:]),
        "grey-by-hand.tif": tiff(rgb.shape[1], rgb.shape[0], rgb[..., 0].tobytes(), ">"),
    }
    refused = {
        **lying(rgb),
        "bomb.png": bomb_png(),
        "truncated.png": png[: len(png) // 2],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "empty.png": b"",
        "text.jpg": b"not an image at all\n",
        "float.tif": encode(np.zeros((8, 8), np.float32), ".tiff"),
    }
    return {**usable, **refused}, set(usable)
