"""Stored tables as data: Ray Datasets for the training loop, decoded splits for the driver.

Every read goes through a committed manifest, and the files handed to Ray Data are verified
against it first (size and sha256), so a flipped byte fails the read instead of training on
it. Rows keep the table's order: the images table is sorted by id, so everything read from
it is too, whatever order Ray's tasks finish in.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from infra.cards import ImagesCard
from infra.store import Manifest, Store
from workers.pixels import decode_pixels

# Keep decoded training pixels in Ray's object store (materialized once) below this size.
MATERIALIZE_BYTES = 512 * 2**20


def verified_paths(store: Store, manifest: Manifest, table: str) -> list[str]:
    """Paths of table ``table`` of ``manifest`` (one file, or every file of a folder), each verified."""
    return store.verified_paths(manifest, table)


def read_table_dataset(store: Store, manifest: Manifest, table: str, columns: list[str]):
    """A Ray Dataset of ``columns`` of a stored table, in the table's row order."""
    import ray.data

    ds = ray.data.read_parquet(verified_paths(store, manifest, table), filesystem=store.pa_filesystem)
    return ds.select_columns(columns)


def training_dataset(store: Store, manifest: Manifest, table: str, columns: list[str]):
    """The train split of a stored table (all rows when it has no ``split`` column)."""
    import ray.data
    from ray.data.expressions import col

    ds = ray.data.read_parquet(verified_paths(store, manifest, table), filesystem=store.pa_filesystem)
    if "split" in ds.schema().names:
        ds = ds.filter(expr=col("split") == "train")
    return ds.select_columns(columns)


def split_rows(
    store: Store, manifest: Manifest, table: str, split: str, columns: list[str], limit: int
) -> dict[str, np.ndarray] | None:
    """The first ``limit`` rows of ``split`` (in table order) of a stored table, read on the caller.

    Streams the verified files batch by batch and stops once it has ``limit`` rows, so a held-out
    slice of a large table costs a read of its first parts, not the table. Returns ``columns`` as
    numpy arrays (tensor columns as (N, *shape)); None when the split has no rows.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from infra.tables import table_column_to_numpy

    chosen: list[pa.Table] = []
    found = 0
    for path in verified_paths(store, manifest, table):
        if found >= limit:
            break
        parquet = pq.ParquetFile(path, filesystem=store.pa_filesystem)
        for batch in parquet.iter_batches(batch_size=4096, columns=["split", *columns]):
            part = pa.Table.from_batches([batch])
            part = part.filter(pc.equal(part.column("split"), split)).slice(0, limit - found)
            if part.num_rows:
                chosen.append(part)
                found += part.num_rows
            if found >= limit:
                break
    if not chosen:
        return None
    rows = pa.concat_tables(chosen)
    return {name: table_column_to_numpy(rows, name) for name in columns}


def decode_split(
    batch: Mapping[str, np.ndarray], split: str, channels: int, image_size: int, labelled_only: bool
) -> dict[str, np.ndarray]:
    """Ray Data UDF: image rows of ``split`` -> {"pixels": uint8 (n, C, H, W), "label": (n,)}."""
    keep = batch["split"] == split
    if labelled_only:
        keep &= batch["label"] >= 0
    chosen = [image for image, k in zip(batch["image"], keep) if k]
    labels = np.asarray(batch["label"], dtype=np.int64)[keep]
    if not chosen:  # the same trailing shape as every other block, so the column stays fixed-shape
        return {"pixels": np.zeros((0, channels, image_size, image_size), dtype=np.uint8), "label": labels}
    return {"pixels": decode_pixels(chosen, channels).transpose(0, 3, 1, 2), "label": labels}  # (N, C, H, W)


def pixel_dataset(store: Store, images: Manifest, split: str, labelled_only: bool = False):
    """Decoded images of one split as rows {"pixels" uint8 (C, H, W), "label"}, for the loop."""
    card = ImagesCard.from_manifest(images)
    ds = read_table_dataset(store, images, "images", ["split", "label", "image"])
    ds = ds.map_batches(
        decode_split,
        batch_format="numpy",
        fn_kwargs={
            "split": split,
            "channels": card.channels,
            "image_size": card.image_size,
            "labelled_only": labelled_only,
        },
    )
    rows = card.n_train if split == "train" else card.n_test
    if rows * card.channels * card.image_size**2 <= MATERIALIZE_BYTES:
        ds = ds.materialize()  # epochs re-read blocks instead of re-decoding PNGs
    return ds


@dataclass(frozen=True)
class SplitPixels:
    """Decoded images of one split, in table (id) order."""

    pixels: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 = unlabelled


def read_split(store: Store, images: Manifest, split: str, limit: int | None = None) -> SplitPixels:
    """The first ``limit`` images (by id) of ``split``, decoded on the caller (driver or task)."""
    channels = ImagesCard.from_manifest(images).channels
    table = store.read_table(images, "images", columns=["split", "label", "image"])
    chosen = np.flatnonzero(np.asarray(table.column("split").to_pylist()) == split)[:limit]
    if len(chosen) == 0:
        return SplitPixels(np.zeros((0, 1, 1, channels), np.uint8), np.zeros((0,), np.int64))
    column = table.column("image")
    pixels = decode_pixels((column[int(i)].as_py() for i in chosen), channels)  # (N, H, W, C)
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)[chosen]
    return SplitPixels(pixels, labels)


def order_preserving_options():
    """Ray Data execution options that keep the input's row order (for Ray Train's DataConfig)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options.__class__()
    options.preserve_order = True
    return options


@contextmanager
def preserved_order():
    """Ray Data keeps the input order while this is open (for datasets the driver iterates)."""
    from ray.data import DataContext

    options = DataContext.get_current().execution_options
    before = options.preserve_order
    options.preserve_order = True
    try:
        yield
    finally:
        options.preserve_order = before
