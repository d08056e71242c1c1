"""Sample grids: the same seeds from full precision and from the evaluated model, side by side.

A number says how far two models are apart; the grid shows *how* (colour shift, noise, lost detail),
which is what a reviewer looks at first. Same seeds on both sides make the comparison image by image.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_write_bytes


def make_grid(images: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 255) -> np.ndarray:
    """uint8 NHWC images → one uint8 HWC grid of `nrow` columns (fewer images leave blank cells)."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected non-empty uint8 images [N, H, W, C], got {images.shape} {images.dtype}")
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y : y + h, x : x + w] = img
    return grid


def side_by_side(
    panels: Sequence[np.ndarray],
    labels: Optional[Sequence[str]] = None,
    nrow: int = 8,
    scale: int = 2,
    gap: int = 12,
) -> "PIL.Image.Image":  # noqa: F821
    """Grids of each image set next to each other, nearest-neighbour upscaled, labelled on top."""
    from PIL import Image, ImageDraw

    grids = [make_grid(p[: nrow * nrow], nrow=nrow) for p in panels]
    h = max(g.shape[0] for g in grids) * scale
    label_h = 16 if labels else 0
    width = sum(g.shape[1] * scale for g in grids) + gap * (len(grids) - 1)
    canvas = Image.new("RGB", (width, h + label_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    x = 0
    for i, g in enumerate(grids):
        img = Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
        canvas.paste(img, (x, label_h))
        if labels:
            draw.text((x + 4, 2), labels[i], fill=(0, 0, 0))
        x += img.width + gap
    return canvas


def save_comparison_grid(
    path: str | os.PathLike,
    fp_images: np.ndarray,
    test_images: Optional[np.ndarray] = None,
    test_label: str = "evaluated",
    nrow: int = 8,
) -> Path:
    """Write an 8×8 grid PNG: full precision alone, or full precision | evaluated model (same seeds)."""
    panels, labels = [fp_images], ["full precision"]
    if test_images is not None:
        if len(test_images) != len(fp_images):
            raise ValueError(f"fp and test image counts differ: {len(fp_images)} vs {len(test_images)}")
        panels.append(test_images)
        labels.append(test_label)
    buf = io.BytesIO()
    side_by_side(panels, labels, nrow=nrow).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
