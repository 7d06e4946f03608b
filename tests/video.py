"""Frames for the source tests' video files, and damage done to such a file (the files are written as the demo
writes its video: ``patchline.runtime.tools.demo.write_video``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def corrupt_frames(path: Path, indices: list[int]) -> None:
    """Zero the given JPEG frames between their start and end markers, so that no decoder can read them."""
    data = bytearray(path.read_bytes())
    starts = [i for i in range(len(data) - 2) if data[i : i + 3] == b"\xff\xd8\xff"]
    for index in indices:
        start = starts[index]
        end = data.index(b"\xff\xd9", start)
        data[start + 2 : end] = bytes(end - start - 2)  # keep the sizes the container records
    path.write_bytes(bytes(data))


def grey_frames(count: int, size: tuple[int, int] = (96, 128)) -> list[np.ndarray]:
    """Frames whose brightness encodes their index (10 grey levels apart), to check order and gaps."""
    return [np.full((*size, 3), 10 + 10 * i, np.uint8) for i in range(count)]
