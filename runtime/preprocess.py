"""Image reading and preprocessing, shared by export and runtime.

Export fits the memory bank on images prepared by exactly these functions, so the
runtime sees the same pixels for the same file.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from patchline.runtime.image_header import DEFAULT_MAX_PIXELS, HeaderError, image_size

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".gif")
# OpenCV filters on 8-bit pixels, or "antialias": torchvision's Resize(antialias=True) on floats (below).
RESIZE_METHODS = {"area": cv2.INTER_AREA, "bilinear": cv2.INTER_LINEAR, "antialias": None}


class ImageError(ValueError):
    """An image file that cannot be used, with the path and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder`` (recursive), sorted; dot-files (macOS ``._x.png`` metadata) left out."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a directory")
    return sorted(p for p in root.rglob("*")
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def is_mvtec_category(folder: str | Path) -> bool:
    """An MVTec-AD category folder: one with ``test/<class>/`` (and usually ``train/good``)."""
    return (Path(folder) / "test").is_dir()


def training_root(folder: str | Path) -> Path:
    """Where the good training images are: an MVTec category's ``train/good``, else the folder itself."""
    good = Path(folder) / "train" / "good"
    return good if good.is_dir() else Path(folder)


def evaluation_root(folder: str | Path) -> Path:
    """Where the test images (all classes) are: an MVTec category's ``test/``, else the folder itself."""
    return Path(folder) / "test" if is_mvtec_category(folder) else Path(folder)


def iter_images(paths: Iterable[Path], max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> Iterator[tuple[Path, np.ndarray | ImageError]]:
    """(path, RGB uint8) for each readable image, (path, ImageError) for each unusable one: the caller counts them."""
    for path in paths:
        try:
            yield path, read_image(path, max_pixels)
        except ImageError as exc:
            yield path, exc


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


def decode_image(data: bytes, source: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decode an encoded image (PNG, JPEG, GIF, BMP, TIFF, WebP) to RGB uint8, or raise ImageError naming
    ``source`` and the problem.

    The size its header declares is checked against ``max_pixels`` before decoding, so that a small
    file claiming gigapixels (a decompression bomb, or a lying header) costs no memory.
    """
    if not data:
        raise ImageError(source, "empty file")
    try:
        kind, width, height = image_size(data)
    except HeaderError as exc:
        raise ImageError(source, str(exc)) from None
    if width * height > max_pixels:
        raise ImageError(source, f"its {kind} header declares {width}x{height} pixels, more than the limit of "
                                 f"{max_pixels} (max_pixels)")
    if _truncated_jpeg(data):
        raise ImageError(source, "truncated JPEG (no end-of-image marker)")
    try:
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    except (cv2.error, MemoryError) as exc:  # OpenCV asserts on headers it refuses; a decoder may run out of memory
        raise ImageError(source, f"the {kind} decoder refused it: {_first_line(exc)}") from None
    if image is None or image.size == 0:
        raise ImageError(source, "not a decodable image (corrupt or truncated)")
    return to_rgb8(image, source)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def read_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read an image file as RGB uint8, or raise ImageError naming the file and the problem."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageError(path, f"cannot read: {exc.strerror}") from exc
    return decode_image(data, path, max_pixels)


@functools.lru_cache(maxsize=32)
def _antialias_weights(size_in: int, size_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Source indices and weights (size_out, taps) of torch's antialiased bilinear (PIL's triangle filter),
    cached per size pair (a camera's frames all have one size) and read-only for that reason.

    A port of ATen's _compute_indices_min_size_weights_aa for float32 input: downscaling widens the
    filter to the scale, and each output pixel's window is clipped to the image and renormalised.
    ATen mixes float32 and float64 arithmetic; the casts below repeat its promotions one by one,
    since float64 throughout moves weights by up to 1e-5 (0.003 on 0..255 pixels).
    """
    f32, f64 = np.float32, np.float64
    scale = f32(size_in) / f32(size_out)
    support, inverse = (scale, f32(1.0 / f64(scale))) if scale >= 1.0 else (f32(1.0), f32(1.0))
    centers = (f64(scale) * (np.arange(size_out) + 0.5)).astype(f32)
    first = np.maximum(((centers - support).astype(f64) + 0.5).astype(np.int64), 0)
    last = np.minimum(((centers + support).astype(f64) + 0.5).astype(np.int64), size_in)
    max_taps = int(np.ceil(support)) * 2 + 1
    count = np.clip(last - first, 0, max_taps)
    taps = np.arange(int(count.max()))
    offsets = ((first[:, None] + taps).astype(f32) - centers[:, None]).astype(f64) + 0.5
    distance = np.abs((offsets * f64(inverse)).astype(f32))
    weights = np.where(distance < 1.0, 1.0 - distance, 0.0).astype(f32)
    weights[taps >= count[:, None]] = 0.0
    total = np.zeros(size_out, f32)
    for tap in taps:  # summed in order, in float32, as ATen does
        total += weights[:, tap]
    weights = np.divide(weights, total[:, None], out=weights, where=total[:, None] != 0)
    index = np.minimum(first[:, None] + taps, size_in - 1)
    index.setflags(write=False)
    weights.setflags(write=False)
    return index, weights


def antialias_resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W, C) → float32 (height, width, C), as torch.nn.functional.interpolate(bilinear, antialias=True)
    on the image as float32.

    Separable like ATen: the width first, then the height, each a float32 sum over the filter's few
    taps in tap order (no dense matrices); the first pass reads the 8-bit pixels directly.
    """
    out = rgb
    for axis in (1, 0):
        if out.shape[axis] == size[axis]:
            continue
        index, weights = _antialias_weights(out.shape[axis], size[axis])
        weights = weights.reshape(weights.shape + (1,) * (out.ndim - 1 - axis))  # broadcast along `axis`
        acc = weights[:, 0] * np.take(out, index[:, 0], axis=axis)
        for tap in range(1, index.shape[1]):
            acc += weights[:, tap] * np.take(out, index[:, tap], axis=axis)
        out = acc
    return out.astype(np.float32, copy=False)


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

    @property
    def input_size(self) -> tuple[int, int]:
        """(height, width) of the network's input: the centre crop, else the resized image."""
        return self.center_crop or self.image_size

    def crop_box(self) -> tuple[int, int, int, int]:
        """(top, left, height, width) of the network input within the resized image; offsets as torchvision rounds them."""
        height, width = self.input_size
        return round((self.image_size[0] - height) / 2), round((self.image_size[1] - width) / 2), height, width

    def resize_image(self, rgb: np.ndarray) -> np.ndarray:
        height, width = self.image_size
        if self.resize == "antialias":
            return antialias_resize(rgb, self.image_size)
        return cv2.resize(rgb, (width, height), interpolation=RESIZE_METHODS[self.resize])

    @functools.cached_property
    def _normalisation(self) -> tuple[np.float32, np.ndarray, np.ndarray]:
        return np.float32(1.0 / 255.0), np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)

    def __call__(self, images: list[np.ndarray]) -> np.ndarray:
        """RGB uint8 images of any size → float32 array (N, 3, H, W)."""
        scale, mean, std = self._normalisation
        top, left, height, width = self.crop_box()
        batch = np.stack([self.resize_image(img)[top : top + height, left : left + width] for img in images])
        batch = batch.astype(np.float32, copy=False)  # np.stack made a new array: safe to work in place
        batch *= scale
        batch -= mean
        batch /= std
        return np.ascontiguousarray(batch.transpose(0, 3, 1, 2))
