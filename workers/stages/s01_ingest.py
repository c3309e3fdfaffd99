"""Stage 1, ingest: a dataset on disk or S3 -> the ``images`` table every later stage reads.

Sources (``IngestConfig.source``, see :mod:`workers.sources`): the built-in ``digits``,
``shapes`` and ``glyphs`` (procedural RGB, ``shapes_count`` images from ``shapes_seed``); an
image folder (png/jpg/..., recursive, local or ``s3://``; first-level sub-folders are the
classes, or no labels at all); a Parquet file or folder with a column of encoded images.

Ray Data reads and decodes in parallel; every image is converted to ``L``/``RGB``, its
shorter side scaled to ``image_size`` and centre-cropped, and stored as PNG. The split hashes
the id, so an image keeps its side when the dataset grows. Files that cannot be read or
decoded go to the ``quarantine`` table with the reason; too many of them fail the stage
before anything is committed. The stage key includes the source's fingerprint.

Streaming: the rows never gather on the driver. Ray Data tasks write the ``images`` table
(and the quarantine) as ordered Parquet parts, ``images/part-<first id>.parquet``
(:mod:`workers.parts`), and the driver sums one stats row per part. Built-in sets and folders
produce their rows in id order with unique ids, so they stream straight through; a Parquet
source (ids from the image bytes) is decoded once into Ray's object store, then sorted by id
and deduplicated by Ray Data (a distributed sort: the first row of each id, by label and path,
is kept). The same config gives the same parts, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pyarrow as pa
import pyarrow.compute as pc

from infra.cards import ImagesCard
from infra.config import IngestConfig, StageInputError
from infra.schemas import IMAGES_SCHEMA, QUARANTINE_SCHEMA
from infra.store import Manifest, StageWriter, Store
from workers import progress
from workers.data import preserved_order
from workers.parts import add_written, bound, first_of_each_id, ordered, rows_per_part, write_parts
from workers.pixels import DECODE_ERRORS, encode_png, prepare_image
from workers.runner import run_stage
from workers.sources.builtin import digits_dataset, procedural_dataset
from workers.sources.files import folder_dataset, parquet_dataset
from workers.sources.listing import Source, resolve_source

log = logging.getLogger("fewstep.ingest")

STAGE = "ingest"

# Rows after the decode step: "error" is "" for a usable image.
DECODED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("path", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("error", pa.string()),
    ]
)
# Sources whose raw rows come in id order with unique ids (built-in sets; folders, listed and
# sorted on the driver). Any other source is sorted and deduplicated by Ray Data.
ORDERED_KINDS = ("digits", "shapes", "glyphs", "folder")


def assign_split(image_id: str, test_fraction: float) -> str:
    """ "test" when u(id) < test_fraction, with u(id) = first 60 bits of sha1("split:" + id) / 2^60."""
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
            "id": batch["id"],
            "path": batch["path"],
            "label": batch["label"],
            "image": pa.array(images, pa.binary()),
            "width": pa.array(widths, pa.int32()),
            "height": pa.array(heights, pa.int32()),
            "error": pa.array(errors, pa.string()),
        },
        schema=DECODED_SCHEMA,
    )


def raw_dataset(source: Source, config: IngestConfig):
    """(raw rows, class names) for the source's kind."""
    if source.kind == "digits":
        return digits_dataset(config.limit)
    if source.kind in ("shapes", "glyphs"):
        return procedural_dataset(source.kind, config.shapes_count, config.shapes_seed, config.limit)
    if source.kind == "folder":
        return folder_dataset(source, config.limit)
    if source.kind == "parquet":
        return parquet_dataset(source, config)
    raise StageInputError(f"ingest source kind {source.kind!r} is not readable yet")


def image_parts(batch: pa.Table, test_fraction: float) -> tuple[dict[str, pa.Table], dict]:
    """One part of decoded rows (sorted by id) -> its ``images`` and ``quarantine`` tables, and stats."""
    bad_mask = pc.not_equal(batch["error"], "")
    bad, good = batch.filter(bad_mask), batch.filter(pc.invert(bad_mask))
    splits = pa.array([assign_split(i, test_fraction) for i in good["id"].to_pylist()], pa.string())
    images = pa.table(
        {
            "id": good["id"],
            "split": splits,
            "label": good["label"],
            "image": good["image"],
            "width": good["width"],
            "height": good["height"],
        },
        schema=IMAGES_SCHEMA,
    )
    quarantine = pa.table({"id": bad["id"], "path": bad["path"], "reason": bad["error"]}, schema=QUARANTINE_SCHEMA)
    copies = good["copies"] if "copies" in good.column_names else None
    top = pc.max(good["label"]).as_py() if good.num_rows else None
    stats = {
        "images": good.num_rows,
        "test": int(pc.sum(pc.equal(splits, "test")).as_py() or 0),
        "bad": bad.num_rows,
        "duplicates": int(pc.sum(copies).as_py() or 0) - good.num_rows if copies is not None else 0,
        "max_label": -1 if top is None else int(top),
        "examples": json.dumps([[p, r] for p, r in zip(bad["path"].to_pylist()[:3], bad["error"].to_pylist()[:3])]),
    }
    return {"images": images, "quarantine": quarantine}, stats


def sorted_unique(decoded, limit: int | None) -> tuple[object, object, int]:
    """(good rows sorted by id, one per id, the first ``limit``; bad rows sorted by id; decoded rows).

    The decode runs once: its output is held in Ray's object store for the two branches.
    """
    from ray.data.expressions import col

    decoded = ordered(decoded).materialize()
    good = decoded.filter(expr=col("error") == "").sort("id")
    good = good.map_batches(
        first_of_each_id, batch_size=None, batch_format="pyarrow", fn_kwargs={"tie_break": ("label", "path")}
    )
    if limit is not None:
        good = good.limit(limit)
    bad = decoded.filter(expr=col("error") != "").sort("id")
    return good, bad, decoded.count()


def run_ingest(store: Store, config: IngestConfig) -> Manifest:
    """Build (or reuse) the images table for ``config.source``; returns the committed manifest."""
    source = resolve_source(store, config.source)
    key_config = {**config.keyed(), "source_kind": source.kind, "source_fingerprint": source.fingerprint}

    def build(writer: StageWriter, key: str) -> ImagesCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        ds, classes = raw_dataset(source, config)
        ds = ds.map_batches(
            decode_images,
            batch_format="pyarrow",
            batch_size=64,
            fn_kwargs={"image_size": config.image_size, "channels": config.channels},
        )
        metadata = {
            "fewstep.image_size": str(config.image_size),
            "fewstep.channels": str(config.channels),
            "fewstep.classes": json.dumps(classes),
            "fewstep.source_fingerprint": source.fingerprint,
            **({"fewstep.num_classes": str(len(classes))} if classes else {}),
        }
        make = bound(image_parts, test_fraction=config.test_fraction)
        rows = rows_per_part(config.image_size**2 * config.channels)
        parts: list[dict] = []
        with preserved_order():
            if source.kind in ORDERED_KINDS:  # one streaming pass; the limit was applied at the source
                branches, total = [ds], None
            else:
                good, bad, total = sorted_unique(ds, config.limit)
                branches = [good, bad]
            for branch in branches:
                for stats in write_parts(branch, writer, make, rows, metadata):
                    parts.append(stats)
                    if total:
                        progress.advance(STAGE, sum(p["rows"] for p in parts), total)
        n_images, n_bad = sum(p["images"] for p in parts), sum(p["bad"] for p in parts)
        total = total if total is not None else n_images + n_bad
        if total == 0 or n_bad / total > config.max_bad_fraction or n_images == 0:
            examples = "; ".join([f"{p}: {r}" for part in parts for p, r in json.loads(part["examples"])][:3])
            raise StageInputError(
                f"ingest: {n_bad} of {total} images from {config.source!r} are unusable, more than "
                f"max_bad_fraction={config.max_bad_fraction}; e.g. {examples or 'no images at all'}. "
                "Fix or remove those files, or raise 'ingest.max_bad_fraction'"
            )
        folders = add_written(writer, parts)
        if "quarantine" not in folders:
            writer.write_table("quarantine", QUARANTINE_SCHEMA.empty_table())
        else:
            first = next(p for p in parts if p["bad"])
            log.warning("ingest: quarantined %d file(s), e.g. %s", n_bad, json.loads(first["examples"])[0])

        # Named classes (folders, string labels, digits) count even when `limit` left one out.
        top = max(p["max_label"] for p in parts)
        num_classes = len(classes) or (top + 1 if top >= 0 else 0)
        n_test = sum(p["test"] for p in parts)
        return ImagesCard(
            n_images=n_images,
            n_train=n_images - n_test,
            n_test=n_test,
            num_classes=num_classes,
            image_size=config.image_size,
            channels=config.channels,
            source_kind=source.kind,
            classes=tuple(classes),
            quarantined=n_bad,
            duplicates=sum(p["duplicates"] for p in parts),
            skipped=source.skipped,
            skipped_examples=source.skipped_examples,
        )

    return run_stage(store, STAGE, key_config, [], build, source=__name__)
