"""The built-in datasets as raw rows: scikit-learn's digits (the quick smoke test), the
procedural RGB shapes benchmark (the quality preset) and the procedural RGB glyphs (a second
labelled set nobody tunes on), the procedural ones rendered in blocks on Ray Data."""

from __future__ import annotations

import numpy as np

from workers.pixels import encode_png
from workers.sources import ROWS_PER_BLOCK, blocks_for


def digits_dataset(limit: int | None):
    """(raw rows, class names) of the 1,797 8x8 digits, ink 0..16 -> grey levels 0..255."""
    import ray.data
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    n = len(pixels) if limit is None else min(limit, len(pixels))
    items = [
        {
            "id": f"digits-{i:05d}",
            "path": f"digits[{i}]",
            "label": int(digits.target[i]),
            "data": encode_png(pixels[i]),
            "error": "",
        }
        for i in range(n)
    ]
    return ray.data.from_items(items, override_num_blocks=blocks_for(n)), [str(k) for k in range(10)]


def _renderer(kind: str):
    """(render function, class names) of a procedural built-in set: ``shapes`` or ``glyphs``."""
    if kind == "shapes":
        from workers.sources.shapes import SHAPE_CLASSES, render_shapes

        return render_shapes, SHAPE_CLASSES
    if kind == "glyphs":
        from workers.sources.glyphs import GLYPH_CLASSES, render_glyphs

        return render_glyphs, GLYPH_CLASSES
    raise ValueError(f"unknown procedural set {kind!r}: choose 'shapes' or 'glyphs'")


def render_block(batch: dict, seed: int, kind: str = "shapes") -> dict:
    """Ray Data UDF: rows {"start", "count"} -> raw rows of procedural images ``start .. start + count``."""
    render, _ = _renderer(kind)
    ids, paths, labels, data = [], [], [], []
    for start, count in zip(batch["start"], batch["count"]):
        rendered = render(int(start), int(count), seed)
        for offset, (pixels, label) in enumerate(zip(rendered.pixels, rendered.labels)):
            i = int(start) + offset
            ids.append(f"{kind}-{i:07d}")
            paths.append(f"{kind}[{seed}][{i}]")
            labels.append(int(label))
            data.append(encode_png(pixels))
    return {
        "id": np.array(ids),
        "path": np.array(paths),
        "label": np.array(labels, dtype=np.int64),
        "data": np.array(data, dtype=object),
        "error": np.array([""] * len(ids)),
    }


def procedural_dataset(kind: str, count: int, seed: int, limit: int | None):
    """(raw rows, class names) of ``count`` (or ``limit``) procedural 32x32 RGB images, 10 classes:
    ``shapes`` (:mod:`workers.sources.shapes`) or ``glyphs`` (:mod:`workers.sources.glyphs`).

    Image i depends only on (seed, i), so any block boundaries render the same dataset."""
    import ray.data

    _, classes = _renderer(kind)
    n = count if limit is None else min(limit, count)
    blocks = [{"start": start, "count": min(ROWS_PER_BLOCK, n - start)} for start in range(0, n, ROWS_PER_BLOCK)]
    ds = ray.data.from_items(blocks, override_num_blocks=len(blocks))
    return ds.map_batches(render_block, batch_size=1, fn_kwargs={"seed": seed, "kind": kind}), list(classes)
