"""The built-in datasets as raw rows: scikit-learn's digits (the quick smoke test)."""

from __future__ import annotations

import numpy as np

from workers.pixels import encode_png
from workers.sources import blocks_for


def digits_dataset(limit: int | None):
    """(raw rows, class names) of the 1,797 8x8 digits, ink 0..16 -> grey levels 0..255."""
    import ray.data
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    n = len(pixels) if limit is None else min(limit, len(pixels))
    items = [
        {"id": f"digits-{i:05d}", "path": f"digits[{i}]", "label": int(digits.target[i]),
         "data": encode_png(pixels[i]), "error": ""}
        for i in range(n)
    ]
    return ray.data.from_items(items, override_num_blocks=blocks_for(n)), [str(k) for k in range(10)]
