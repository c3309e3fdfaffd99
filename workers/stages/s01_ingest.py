"""Stage 1, ingest: a dataset on disk or S3 -> the ``images`` table every later stage reads.

Sources (``IngestConfig.source``, see :mod:`workers.sources`): the built-in ``digits`` and
``shapes`` (procedural RGB, ``shapes_count`` images from ``shapes_seed``); an
image folder (png/jpg/..., recursive, local or ``s3://``; first-level sub-folders are the
classes, or no labels at all); a Parquet file or folder with a column of encoded images.

Ray Data reads and decodes in parallel; every image is converted to ``L``/``RGB``, its
shorter side scaled to ``image_size`` and centre-cropped, and stored as PNG. The split hashes
the id, so an image keeps its side when the dataset grows. Files that cannot be read or
decoded go to the ``quarantine`` table with the reason; too many of them fail the stage
before anything is committed. The stage key includes the source's fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from infra.cards import ImagesCard
from infra.config import IngestConfig, StageInputError
from infra.schemas import IMAGES_SCHEMA, QUARANTINE_SCHEMA
from infra.store import Manifest, StageWriter, Store
from workers.pixels import DECODE_ERRORS, encode_png, prepare_image
from workers.runner import run_stage
from workers.sources.builtin import digits_dataset, shapes_dataset
from workers.sources.files import folder_dataset, parquet_dataset
from workers.sources.listing import Source, resolve_source

log = logging.getLogger("fewstep.ingest")

STAGE = "ingest"

# Rows after the decode step: "error" is "" for a usable image.
DECODED_SCHEMA = pa.schema([
    ("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("image", pa.binary()),
    ("width", pa.int32()), ("height", pa.int32()), ("error", pa.string()),
])


def assign_split(image_id: str, test_fraction: float) -> str:
    """"test" when u(id) < test_fraction, with u(id) = first 60 bits of sha1("split:" + id) / 2^60."""
    u = int(hashlib.sha1(f"split:{image_id}".encode()).hexdigest()[:15], 16) / float(16**15)
    return "test" if u < test_fraction else "train"


def decode_images(batch: pa.Table, image_size: int, channels: int) -> pa.Table:
    """Ray Data UDF: encoded bytes -> a ``image_size``-square PNG in L/RGB; a broken image gets an error."""
    images, widths, heights, errors = [], [], [], []
    for data, error in zip(batch["data"].to_pylist(), batch["error"].to_pylist()):
        if not error:
            try:
                image = prepare_image(data, image_size, channels)
                images.append(encode_png(image))
                widths.append(image.width)
                heights.append(image.height)
                errors.append("")
                continue
            except DECODE_ERRORS as exc:
                error = f"not a readable image: {type(exc).__name__}: {exc}"
        images.append(b"")
        widths.append(0)
        heights.append(0)
        errors.append(error)
    return pa.table(
        {
            "id": batch["id"], "path": batch["path"], "label": batch["label"],
            "image": pa.array(images, pa.binary()), "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()), "error": pa.array(errors, pa.string()),
        },
        schema=DECODED_SCHEMA,
    )


def raw_dataset(source: Source, config: IngestConfig):
    """(raw rows, class names) for the source's kind."""
    if source.kind == "digits":
        return digits_dataset(config.limit)
    if source.kind == "shapes":
        return shapes_dataset(config.shapes_count, config.shapes_seed, config.limit)
    if source.kind == "folder":
        return folder_dataset(source, config.limit)
    if source.kind == "parquet":
        return parquet_dataset(source, config)
    raise StageInputError(f"ingest source kind {source.kind!r} is not readable yet")


def collect(ds) -> pa.Table:
    parts = [batch for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(parts).combine_chunks() if parts else DECODED_SCHEMA.empty_table()


def num_classes_of(labels: pa.ChunkedArray) -> int:
    """max(label) + 1 over labelled rows; 0 when nothing is labelled."""
    top = pc.max(labels).as_py()
    return 0 if top is None or top < 0 else int(top) + 1


def run_ingest(store: Store, config: IngestConfig) -> Manifest:
    """Build (or reuse) the images table for ``config.source``; returns the committed manifest."""
    source = resolve_source(store, config.source)
    key_config = {**config.keyed(), "source_kind": source.kind, "source_fingerprint": source.fingerprint}

    def build(writer: StageWriter, key: str) -> ImagesCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        ds, classes = raw_dataset(source, config)
        ds = ds.map_batches(decode_images, batch_format="pyarrow", batch_size=64,
                            fn_kwargs={"image_size": config.image_size, "channels": config.channels})
        rows = collect(ds).sort_by([("id", "ascending"), ("label", "ascending"), ("path", "ascending")])

        bad_mask = pc.not_equal(rows["error"], "")
        bad, good = rows.filter(bad_mask), rows.filter(pc.invert(bad_mask))
        total = rows.num_rows
        if total == 0 or bad.num_rows / total > config.max_bad_fraction or good.num_rows == 0:
            examples = "; ".join(f"{p}: {r}" for p, r in zip(bad["path"].to_pylist()[:3], bad["error"].to_pylist()[:3]))
            raise StageInputError(
                f"ingest: {bad.num_rows} of {total} images from {config.source!r} are unusable, more than "
                f"max_bad_fraction={config.max_bad_fraction}; e.g. {examples or 'no images at all'}. "
                "Fix or remove those files, or raise 'ingest.max_bad_fraction'"
            )
        # Identical content -> one id (Parquet): keep the first of each run of equal ids.
        ids = good["id"].to_numpy(zero_copy_only=False)
        keep = np.ones(len(ids), dtype=bool)
        keep[1:] = ids[1:] != ids[:-1]
        good = good.filter(pa.array(keep))
        if config.limit is not None:
            good = good.slice(0, config.limit)
        splits = pa.array([assign_split(i, config.test_fraction) for i in good["id"].to_pylist()], pa.string())
        images = pa.table({"id": good["id"], "split": splits, "label": good["label"], "image": good["image"],
                           "width": good["width"], "height": good["height"]}, schema=IMAGES_SCHEMA)
        quarantine = pa.table({"id": bad["id"], "path": bad["path"], "reason": bad["error"]}, schema=QUARANTINE_SCHEMA)

        # Named classes (folders, string labels, digits) count even when `limit` left one out.
        num_classes = len(classes) or num_classes_of(images["label"])
        writer.write_table("images", images, metadata={
            "fewstep.image_size": str(config.image_size), "fewstep.channels": str(config.channels),
            "fewstep.num_classes": str(num_classes), "fewstep.classes": json.dumps(classes),
            "fewstep.source_fingerprint": source.fingerprint,
        })
        writer.write_table("quarantine", quarantine)
        if quarantine.num_rows:
            log.warning("ingest: quarantined %d file(s), e.g. %s: %s", quarantine.num_rows,
                        quarantine["path"][0].as_py(), quarantine["reason"][0].as_py())
        n_test = int(pc.sum(pc.equal(images["split"], "test")).as_py() or 0)
        return ImagesCard(n_images=images.num_rows, n_train=images.num_rows - n_test, n_test=n_test,
                          num_classes=num_classes, image_size=config.image_size, channels=config.channels,
                          source_kind=source.kind, classes=tuple(classes), quarantined=quarantine.num_rows,
                          duplicates=int((~keep).sum()), skipped=source.skipped,
                          skipped_examples=source.skipped_examples)

    return run_stage(store, STAGE, key_config, [], build, source=__name__)
