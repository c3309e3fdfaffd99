"""Sample grids: the PNGs the evaluation and the probe write of the images they scored."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

GRID_PER_CLASS = 4
GRID_MAX_CLASSES = 10
GRID_CELL_PX = 48  # images are upscaled (nearest) to about this size in the grids


def grid_file(model: str, sampler: str, steps: int, guidance: float | None) -> str:
    """The name of the sample grid the evaluation writes for one row."""
    return f"grids/{model}-{sampler}-{steps}-g{(1.0 if guidance is None else guidance):g}.png"


def make_grid(pixels: np.ndarray, labels: np.ndarray, num_classes: int) -> bytes:
    """A PNG grid: one column per class (the first few classes), ``GRID_PER_CLASS`` samples down;
    for unlabelled images, the first images in rows of ten."""
    n, h, w, c = pixels.shape if len(pixels) else (0, 1, 1, 1)
    if num_classes > 0 and (labels >= 0).any():
        classes = [y for y in range(num_classes) if (labels == y).any()][:GRID_MAX_CLASSES]
        columns = [np.flatnonzero(labels == y)[:GRID_PER_CLASS] for y in classes]
    else:
        order = np.arange(min(n, GRID_PER_CLASS * GRID_MAX_CLASSES))
        columns = [order[i::GRID_MAX_CLASSES] for i in range(min(n, GRID_MAX_CLASSES))]
    cols, pad = max(1, len(columns)), 2
    canvas = np.full((GRID_PER_CLASS * (h + pad) + pad, cols * (w + pad) + pad, c), 128, np.uint8)
    for j, index in enumerate(columns):
        for i, k in enumerate(index):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            canvas[top : top + h, left : left + w] = pixels[k]
    scale = max(1, GRID_CELL_PX // max(h, w))
    image = Image.fromarray(canvas[:, :, 0] if c == 1 else canvas)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
