"""Real video files for the source and daemon tests: MJPEG in AVI, written with OpenCV."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> Path:
    """RGB frames → an MJPEG .avi that GStreamer's filesrc ! decodebin plays."""
    height, width = frames[0].shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    assert writer.isOpened(), f"OpenCV cannot write {path}"
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path


def corrupt_frames(path: Path, indices: list[int]) -> None:
    """Overwrite the headers of the given JPEG frames inside the file, so that no decoder can read them."""
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
