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

Incremental (:func:`plan_ingest`, :mod:`workers.incremental`): a re-run on a grown or changed
folder or Parquet source decodes only new or changed files and carries every other row over
from the newest earlier output of the same settings, part by part; removed files leave. Beside
each ``images`` part an ``index`` part (id, split, label, PNG digest) lets the next run, and
the latents stage, tell unchanged rows without reading images; ``files`` is the listing the
run read. The rows are those a build from scratch gives, but for one case: an image already
ingested that reappears in a new Parquet file keeps its earlier row (and label).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from infra.cards import ImagesCard
from infra.config import IngestConfig, StageInputError
from infra.schemas import IMAGES_SCHEMA, INDEX_SCHEMA, QUARANTINE_SCHEMA, SOURCE_FILES_SCHEMA
from infra.store import Manifest, StageWriter, Store
from infra.version import code_version
from workers import progress
from workers.data import preserved_order
from workers.incremental import carry_parts, part_names, previous_output, read_folder
from workers.parts import add_written, bound, first_of_each_id, ordered, rows_per_part, write_parts
from workers.pixels import DECODE_ERRORS, encode_png, prepare_image
from workers.runner import run_stage
from workers.sources.builtin import digits_dataset, procedural_dataset
from workers.sources.files import folder_classes, folder_dataset, parquet_dataset
from workers.sources.listing import Source, content_id, resolve_source

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


def raw_dataset(source: Source, config: IngestConfig, read: tuple[str, ...] | None = None):
    """(raw rows, class names) for the source's kind; ``read``: only these files (folder, Parquet)."""
    if source.kind == "digits":
        return digits_dataset(config.limit)
    if source.kind in ("shapes", "glyphs"):
        return procedural_dataset(source.kind, config.shapes_count, config.shapes_seed, config.limit)
    if source.kind == "folder":
        return folder_dataset(source, config.limit, read)
    if source.kind == "parquet":
        return parquet_dataset(source, config, read)
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
    digests = pa.array([hashlib.sha1(png).hexdigest() for png in good["image"].to_pylist()], pa.string())
    index = pa.table(
        {"id": good["id"], "split": splits, "label": good["label"], "digest": digests}, schema=INDEX_SCHEMA
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
    return {"images": images, "index": index, "quarantine": quarantine}, stats


def drop_known(batch: pa.Table, known: pa.Array) -> pa.Table:
    """Ray Data UDF: the rows whose id is not in ``known`` (ids an earlier run already holds)."""
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=known)))


def sorted_unique(decoded, limit: int | None, known: pa.Array | None = None) -> tuple[object, object, int]:
    """(good rows sorted by id, one per id, the first ``limit``, none in ``known``; bad rows sorted
    by id; decoded rows).

    The decode runs once: its output is held in Ray's object store for the two branches.
    """
    from ray.data.expressions import col

    decoded = ordered(decoded).materialize()
    good = decoded.filter(expr=col("error") == "")
    if known is not None:
        good = good.map_batches(drop_known, batch_format="pyarrow", batch_size=None, fn_kwargs={"known": known})
    good = good.sort("id")
    good = good.map_batches(
        first_of_each_id, batch_size=None, batch_format="pyarrow", fn_kwargs={"tie_break": ("label", "path")}
    )
    if limit is not None:
        good = good.limit(limit)
    bad = decoded.filter(expr=col("error") != "").sort("id")
    return good, bad, decoded.count()


@dataclass(frozen=True)
class Plan:
    """What an ingest run reads, and what it carries over from an earlier output (workers.incremental)."""

    previous: Manifest | None = None  # None: build from scratch
    read: tuple[str, ...] | None = None  # source-relative files to decode; None: all
    keep: pa.Array | None = None  # ids of ``previous`` to carry over


FROM_SCRATCH = Plan()


def plan_ingest(store: Store, config: IngestConfig, source: Source, key_config: dict) -> Plan:
    """Compare the source's listing with the newest earlier ingest of the same source and settings.

    Folder: an unchanged file (same path, size and mtime/ETag) keeps its row (its id is its path);
    a new or changed file is decoded; a file that is gone leaves. Parquet (ids from the image
    bytes, deduplicated across files): new files are decoded while every earlier file is
    unchanged; a changed or removed file rebuilds the table. Built-in sets and ``limit`` rebuild.
    """
    if source.kind not in ("folder", "parquet") or config.limit is not None:
        return FROM_SCRATCH
    previous = previous_output(store, STAGE, key_config, code_version(__name__), ignore=("source_fingerprint",))
    if previous is None or "files" not in previous.files or not part_names(previous, "index"):
        return FROM_SCRATCH
    old = store.read_table(previous, "files")
    before = dict(zip(old["path"].to_pylist(), zip(old["size"].to_pylist(), old["version"].to_pylist())))
    same = [f.rel for f in source.files if before.get(f.rel) == (f.size, f.version)]
    read = tuple(f.rel for f in source.files if before.get(f.rel) != (f.size, f.version))
    if source.kind == "folder":
        return Plan(previous, read, pa.array([content_id(rel) for rel in same], pa.string()))
    if len(same) < len(before):
        log.info(
            "ingest: %d of %d Parquet file(s) of %s changed or were removed: reading every file again",
            len(before) - len(same),
            len(before),
            previous.ref,
        )
        return FROM_SCRATCH
    held = [read_folder(store, previous, folder, ["id"]) for folder in ("index", "quarantine")]
    keep = pa.concat_tables([t for t in held if t is not None]).column("id").combine_chunks()
    return Plan(previous, read, keep)


def run_ingest(store: Store, config: IngestConfig) -> Manifest:
    """Build (or reuse) the images table for ``config.source``; returns the committed manifest.

    A grown or changed folder or Parquet source decodes only its new or changed files and
    carries the other rows over from the newest earlier output (:func:`plan_ingest`)."""
    source = resolve_source(store, config.source)
    key_config = {**config.keyed(), "source_kind": source.kind, "source_fingerprint": source.fingerprint}

    def build(writer: StageWriter, key: str) -> ImagesCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        plan = plan_ingest(store, config, source, key_config)
        if plan.read == ():  # nothing new to read: only removed files
            before = ImagesCard.from_manifest(plan.previous)
            ds, classes = None, folder_classes(source)[1] if source.kind == "folder" else list(before.classes)
        else:
            ds, classes = raw_dataset(source, config, plan.read)
        if plan.previous is not None and tuple(classes) != ImagesCard.from_manifest(plan.previous).classes:
            # a class was added or removed: every label may move
            log.info("ingest: the classes changed since %s: reading every file again", plan.previous.ref)
            plan = FROM_SCRATCH
            ds, classes = raw_dataset(source, config)
        if ds is not None:
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
            if ds is None:
                branches, total = [], 0
            elif source.kind in ORDERED_KINDS:  # one streaming pass; the limit was applied at the source
                branches, total = [ds], None
            else:
                good, bad, total = sorted_unique(ds, config.limit, plan.keep)
                branches = [good, bad]
            for branch in branches:
                for stats in write_parts(branch, writer, make, rows, metadata):
                    parts.append(stats)
                    if total:
                        progress.advance(STAGE, sum(p["rows"] for p in parts), total)
        new_images, new_bad = sum(p["images"] for p in parts), sum(p["bad"] for p in parts)
        decoded = total if total is not None else new_images + new_bad
        duplicates = sum(p["duplicates"] for p in parts)
        if plan.keep is not None and source.kind not in ORDERED_KINDS:
            # every good row of the new files is written or a duplicate (within them, or of a row carried over)
            duplicates = decoded - new_bad - new_images
        kept = carry(writer, plan)
        n_images, n_bad = new_images + kept.images, new_bad + kept.bad
        everything = n_images + n_bad
        if everything == 0 or n_bad / everything > config.max_bad_fraction or n_images == 0:
            examples = "; ".join([f"{p}: {r}" for part in parts for p, r in json.loads(part["examples"])][:3])
            raise StageInputError(
                f"ingest: {n_bad} of {everything} images from {config.source!r} are unusable, more than "
                f"max_bad_fraction={config.max_bad_fraction}; e.g. {examples or 'no images at all'}. "
                "Fix or remove those files, or raise 'ingest.max_bad_fraction'"
            )
        folders = add_written(writer, parts)
        if "quarantine" not in folders and not kept.bad:
            writer.write_table("quarantine", QUARANTINE_SCHEMA.empty_table())
        elif new_bad:
            first = next(p for p in parts if p["bad"])
            log.warning("ingest: quarantined %d file(s), e.g. %s", new_bad, json.loads(first["examples"])[0])
        listing = [(f.rel, f.size, f.version) for f in source.files]
        writer.write_table("files", pa.table(list(zip(*listing)) or [[], [], []], schema=SOURCE_FILES_SCHEMA))
        if plan.previous is not None:
            log.info(
                "ingest: decoded %d image(s), carried %d over from %s, %d removed",
                decoded,
                kept.images,
                plan.previous.ref,
                kept.removed,
            )

        # Named classes (folders, string labels, digits) count even when `limit` left one out.
        top = max([p["max_label"] for p in parts] + [kept.max_label])
        num_classes = len(classes) or (top + 1 if top >= 0 else 0)
        n_test = sum(p["test"] for p in parts) + kept.test
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
            duplicates=duplicates + kept.duplicates,
            skipped=source.skipped,
            skipped_examples=source.skipped_examples,
            decoded=decoded,
            reused=kept.images,
            removed=kept.removed,
            previous_ref=plan.previous.ref if plan.previous is not None else None,
        )

    return run_stage(store, STAGE, key_config, [], build, source=__name__)


@dataclass(frozen=True)
class Kept:
    """The rows an ingest carried over from the previous output, counted for the card."""

    images: int = 0
    test: int = 0
    bad: int = 0
    max_label: int = -1
    duplicates: int = 0
    removed: int = 0  # earlier rows left behind that this run did not decode again


def carry(writer: StageWriter, plan: Plan) -> Kept:
    """Copy the previous output's kept images, index and quarantine parts into ``writer``."""
    if plan.previous is None:
        return Kept()
    store, previous = writer.store, plan.previous
    images = carry_parts(writer, previous, ("index", "images"), plan.keep)
    bad = carry_parts(writer, previous, ("quarantine",), plan.keep) if part_names(previous, "quarantine") else None
    index = read_folder(store, previous, "index", ["id", "split", "label"])
    index = index.filter(pc.is_in(index["id"], value_set=plan.keep))
    again = pa.array([content_id(rel) for rel in plan.read or ()], pa.string())
    gone = read_folder(store, previous, "index", ["id"]).column("id")
    top = pc.max(index["label"]).as_py() if index.num_rows else None
    before = ImagesCard.from_manifest(previous)
    return Kept(
        images=images.rows,
        test=int(pc.sum(pc.equal(index["split"], "test")).as_py() or 0),
        bad=bad.rows if bad is not None else 0,
        max_label=-1 if top is None else int(top),
        # Parquet: only new files were read, so every earlier duplicate is still there.
        duplicates=before.duplicates if before.source_kind == "parquet" else 0,
        removed=int(pc.sum(pc.invert(pc.is_in(gone, value_set=pa.concat_arrays([plan.keep, again])))).as_py() or 0),
    )
