"""Image reading and preprocessing, shared by export and runtime.

Export fits the memory bank on images prepared by exactly these functions, so the
runtime sees the same pixels for the same file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
RESIZE_METHODS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR}


class ImageError(ValueError):
    """An image file that cannot be used, with the path and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _truncated_jpeg(data: bytes) -> bool:
    # libjpeg decodes a truncated file with a grey tail and only a warning; the end marker is the tell.
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[-64:]


def to_rgb8(image: np.ndarray, source: str | Path = "<frame>") -> np.ndarray:
    """Bring a decoded image (gray, BGR, BGRA; 8 or 16 bit) to RGB uint8."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ImageError(source, f"unsupported pixel type {image.dtype} (expected 8- or 16-bit)")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    raise ImageError(source, f"unsupported image shape {image.shape}")


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8, or raise ImageError naming the file and the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from exc
    if not data:
        raise ImageError(path, "empty file")
    if _truncated_jpeg(data):
        raise ImageError(path, "truncated JPEG (no end-of-image marker)")
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.size == 0:
        raise ImageError(path, "not a decodable image (corrupt or truncated)")
    return to_rgb8(image, path)


@dataclass(frozen=True)
class Preprocessor:
    """Resize (+ optional centre crop) + ImageNet normalisation to an NCHW float32 tensor, as recorded in the manifest."""

    image_size: tuple[int, int]  # (height, width)
    resize: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: tuple[int, int] | None = None  # (height, width) cut from the resized image, as anomalib's CenterCrop

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_METHODS:
            raise ValueError(f"unknown resize method {self.resize!r}; known: {sorted(RESIZE_METHODS)}")
        if self.center_crop and not all(0 < c <= s for c, s in zip(self.center_crop, self.image_size)):
            raise ValueError(f"centre crop {self.center_crop} does not fit in the resized image {self.image_size}")

    def crop_box(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the network input within the resized image; offsets as torchvision rounds them."""
        height, width = self.center_crop or self.image_size
        return round((self.image_size[0] - height) / 2), round((self.image_size[1] - width) / 2), height, width

    def resize_image(self, rgb: np.ndarray) -> np.ndarray:
        height, width = self.image_size
        return cv2.resize(rgb, (width, height), interpolation=RESIZE_METHODS[self.resize])

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any size → float32 array (N, 3, H, W)."""
        scale = np.float32(1.0 / 255.0)
        mean = np.asarray(self.mean, np.float32)
        std = np.asarray(self.std, np.float32)
        top, left, height, width = self.crop_box()
        batch = np.stack([self.resize_image(img)[top : top + height, left : left + width] for img in images])
        batch = batch.astype(np.float32)
        batch = (batch * scale - mean) / std
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
