"""Heatmap overlays that people look at: the anomaly map in colour over the image."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np


def heatmap_overlay(rgb: np.ndarray, amap: np.ndarray, vmax: float | None = None, alpha: float = 0.45) -> np.ndarray:
    """RGB image with the anomaly map (scaled 0…vmax, default its own max) blended in JET colours."""
    height, width = rgb.shape[:2]
    top = float(amap.max()) if vmax is None else vmax
    scaled = np.clip(amap / max(top, 1e-12), 0.0, 1.0)
    scaled = cv2.resize(scaled.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    colours = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.addWeighted(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), 1 - alpha, colours, alpha, 0)
    return cv2.cvtColor(blended, cv2.COLOR_BGR2RGB)


def encode_rgb(rgb: np.ndarray, image_format: str) -> bytes:
    """The image encoded as ``image_format`` (png, jpg …) in memory."""
    ok, data = cv2.imencode(f".{image_format}", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"OpenCV cannot encode a {rgb.shape} image as {image_format}")
    return data.tobytes()


def write_rgb(path: str | Path, rgb: np.ndarray) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_rgb(rgb, path.suffix.lstrip(".")))
