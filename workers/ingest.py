"""The ingest stage: a dataset on disk or S3 -> the ``images`` table every later stage reads.

Sources (``IngestConfig.source``):

- ``"digits"``: scikit-learn's handwritten digits (8x8, 0..16), upsampled; labels 0-9.
- an image folder (png/jpg/..., recursive, local or ``s3://``): with first-level sub-folders
  the sub-folder name is the class (sorted names -> 0..K-1); without them images are unlabeled.
- a Parquet file or folder with a column of encoded image bytes (plain binary, or a
  ``{bytes, path}`` struct as Hugging Face datasets write it) and an optional label column
  (integers, or strings mapped to 0..K-1 in sorted order).

Ray Data reads and decodes in parallel; every image is converted to ``L``/``RGB``, its
shorter side scaled to ``image_size`` and centre-cropped, and stored as PNG.

Ids are deterministic: ``digits-00042``; sha1 of the source-relative path for folders; sha1
of the image bytes for Parquet (identical images collapse to one row, so a duplicate can
never sit on both sides of the split). The split hashes the id, so an image keeps its side
when the dataset grows. Files that cannot be read or decoded go to the ``quarantine`` table
with the reason; too many of them fail the stage before anything is committed.

The stage key includes a fingerprint of the source (each file's path, size and mtime or
ETag), so a scheduled re-run on changed data builds a new images table.
"""

from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from infra.config import ConfigError, IngestConfig, section_dict
from infra.store import Manifest, StageWriter, Store
from workers.images import DECODE_ERRORS, encode_png, prepare_image
from workers.stage import run_stage

log = logging.getLogger("fewstep.ingest")

STAGE = "ingest"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ROWS_PER_BLOCK = 256  # images per Ray Data block when we create the blocks ourselves
ID_HEX = 20  # 80 bits of sha1: no collisions at any dataset size we will meet

IMAGES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("label", pa.int64()),
        ("image", pa.binary()),
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string())])
# Rows between the read and the decode step: "error" is "" for a row still in the running.
_RAW_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("data", pa.binary()), ("error", pa.string())]
)
_DECODED_SCHEMA = pa.schema(
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


class StageInputError(ConfigError):
    """The stage's input data (not the code) is unusable: the message says what and what to do.

    A ConfigError, so the CLI prints it as one line and flows do not retry it.
    """


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class SourceFile:
    path: str  # full path inside the source filesystem
    rel: str  # path relative to the source root, posix separators
    size: int
    version: str  # mtime or ETag: what changes when the file's content does


@dataclass(frozen=True)
class Source:
    kind: Literal["digits", "folder", "parquet"]
    root: str
    files: tuple[SourceFile, ...]
    fs: Any  # fsspec filesystem (None for digits)
    pa_fs: pafs.FileSystem | None
    fingerprint: str


def content_id(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha1(raw).hexdigest()[:ID_HEX]


def assign_split(image_id: str, test_fraction: float) -> str:
    """"test" when u(id) < test_fraction, with u(id) = first 60 bits of sha1("split:" + id) / 2^60."""
    u = int(hashlib.sha1(f"split:{image_id}".encode()).hexdigest()[:15], 16) / float(16**15)
    return "test" if u < test_fraction else "train"


def source_filesystem(store: Store, source: str) -> tuple[Any, pafs.FileSystem, str]:
    """(fsspec filesystem, pyarrow filesystem, path) for a source.

    An ``s3://`` source on an S3 store uses the store's clients (same endpoint, keys, region:
    MinIO, moto, ...); on a local store, s3fs's defaults (the AWS environment variables).
    """
    protocol, path = fsspec.core.split_protocol(source)
    if protocol in (None, "file", "local"):
        local = fsspec.filesystem("file")
        return local, pafs.LocalFileSystem(), local._strip_protocol(path)
    store_fs = store.fs
    if protocol in ("s3", "s3a") and "s3" in store_fs.protocol:
        return store_fs, store.pa_filesystem, path
    fs = fsspec.filesystem(protocol)
    return fs, pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def _version(info: dict[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _fingerprint(kind: str, files: tuple[SourceFile, ...]) -> str:
    digest = hashlib.sha256(kind.encode())
    for f in files:
        digest.update(f"\n{f.rel}\t{f.size}\t{f.version}".encode())
    return digest.hexdigest()


def resolve_source(store: Store, source: str) -> Source:
    """List the source's files and fingerprint them; decide folder vs Parquet by what it holds."""
    if source == "digits":
        import sklearn

        return Source("digits", "digits", (), None, None, f"sklearn-digits/{sklearn.__version__}")
    fs, pa_fs, root = source_filesystem(store, source)
    if not fs.exists(root):
        raise StageInputError(
            f"ingest source {source!r} does not exist: pass 'digits', an image folder or a Parquet file/folder"
        )
    if fs.isfile(root):
        infos = {root: fs.info(root)}
        base = posixpath.dirname(root.rstrip("/"))
    else:
        infos = fs.find(root, detail=True)
        base = root.rstrip("/")
    files = []
    for path, info in sorted(infos.items()):
        rel = posixpath.relpath(path, base) if base else path
        if info.get("type", "file") != "file" or _hidden(rel):
            continue
        files.append(SourceFile(path, rel, int(info.get("size") or 0), _version(info)))
    images = tuple(f for f in files if f.rel.lower().endswith(IMAGE_EXTENSIONS))
    tables = tuple(f for f in files if f.rel.lower().endswith(".parquet"))
    if images and tables:
        raise StageInputError(
            f"ingest source {source!r} holds both image files ({len(images)}) and Parquet files "
            f"({len(tables)}); point 'ingest.source' at a folder with only one kind"
        )
    if not images and not tables:
        raise StageInputError(
            f"ingest source {source!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no .parquet files"
        )
    kind = "folder" if images else "parquet"
    chosen = images or tables
    return Source(kind, root, chosen, fs, pa_fs, _fingerprint(kind, chosen))


# --------------------------------------------------------------------------- Ray Data UDFs


def read_files(batch: pa.Table, fs: Any) -> pa.Table:
    """Fill the ``data`` column with each file's bytes; an unreadable file gets an error instead."""
    data, errors = [], []
    for path, error in zip(batch["path"].to_pylist(), batch["error"].to_pylist()):
        if error:
            data.append(b"")
            errors.append(error)
            continue
        try:
            data.append(fs.cat_file(path))
            errors.append("")
        except OSError as exc:
            data.append(b"")
            errors.append(f"unreadable file: {type(exc).__name__}: {exc}")
    return batch.set_column(batch.schema.get_field_index("data"), "data", pa.array(data, pa.binary())).set_column(
        batch.schema.get_field_index("error"), "error", pa.array(errors, pa.string())
    )


def decode_images(batch: pa.Table, image_size: int, channels: int) -> pa.Table:
    """Encoded bytes -> a ``image_size``-square PNG in L/RGB; a broken image gets an error."""
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
        schema=_DECODED_SCHEMA,
    )


def normalize_parquet(
    batch: pa.Table, image_column: str, label_column: str | None, label_map: dict[str, int] | None, base: str
) -> pa.Table:
    """A batch of a user's Parquet rows -> the raw rows (id from the image bytes, int label)."""
    column = batch[image_column]
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")  # Hugging Face datasets' Image feature
    data = column.to_pylist()
    if label_column is None:
        labels = [-1] * len(data)
    elif label_map is not None:
        labels = [-1 if v is None else label_map[str(v)] for v in batch[label_column].to_pylist()]
    else:
        labels = [-1 if v is None else int(v) for v in batch[label_column].to_pylist()]
    paths = [posixpath.relpath(p, base) if base else p for p in batch["path"].to_pylist()]
    ids, errors, payload = [], [], []
    for i, value in enumerate(data):
        if value is None or len(value) == 0:
            ids.append(content_id(f"{paths[i]}#empty#{i}"))
            errors.append(f"empty {image_column!r} value")
            payload.append(b"")
        else:
            ids.append(content_id(value))
            errors.append("")
            payload.append(value)
    return pa.table(
        {
            "id": pa.array(ids, pa.string()),
            "path": pa.array(paths, pa.string()),
            "label": pa.array(labels, pa.int64()),
            "data": pa.array(payload, pa.binary()),
            "error": pa.array(errors, pa.string()),
        },
        schema=_RAW_SCHEMA,
    )


# --------------------------------------------------------------------------- datasets per source


def _blocks(n: int) -> int:
    return max(1, -(-n // ROWS_PER_BLOCK))


def _digits_dataset(limit: int | None):
    import ray.data
    from sklearn.datasets import load_digits

    digits = load_digits()
    # 0..16 ink -> 0..255 grey levels
    pixels = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)  # (N, 8, 8)
    n = len(pixels) if limit is None else min(limit, len(pixels))
    items = [
        {"id": f"digits-{i:05d}", "path": f"digits[{i}]", "label": int(digits.target[i]),
         "data": encode_png(pixels[i]), "error": ""}
        for i in range(n)
    ]
    return ray.data.from_items(items, override_num_blocks=_blocks(n)), [str(k) for k in range(10)]


def _folder_dataset(source: Source, limit: int | None):
    import ray.data

    labelled = any("/" in f.rel for f in source.files)
    classes = sorted({f.rel.split("/", 1)[0] for f in source.files if "/" in f.rel}) if labelled else []
    index = {name: k for k, name in enumerate(classes)}
    items = []
    for f in source.files:
        error, label = "", -1
        if labelled:
            if "/" in f.rel:
                label = index[f.rel.split("/", 1)[0]]
            else:
                error = "image at the top level of a folder whose other images sit in class sub-folders"
        items.append({"id": content_id(f.rel), "path": f.path, "label": label, "data": b"", "error": error})
    items.sort(key=lambda item: item["id"])
    if limit is not None:
        items = items[:limit]
    ds = ray.data.from_items(items, override_num_blocks=_blocks(len(items)))
    ds = ds.map_batches(read_files, batch_format="pyarrow", fn_kwargs={"fs": source.fs}, batch_size=64)
    return ds, classes


def _parquet_dataset(source: Source, config: IngestConfig):
    import ray.data

    filesystem = source.pa_fs
    paths = [f.path for f in source.files]
    schema = pq.read_schema(paths[0], filesystem=filesystem)
    if config.image_column not in schema.names:
        raise StageInputError(
            f"Parquet source {config.source!r} has no column {config.image_column!r} "
            f"(columns: {schema.names}); set 'ingest.image_column' to the column of image bytes"
        )
    image_type = schema.field(config.image_column).type
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)
            or (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0)):
        raise StageInputError(
            f"Parquet column {config.image_column!r} is {image_type}; it must hold encoded image bytes "
            "(binary, or a struct with a 'bytes' field)"
        )
    label_column = config.label_column if config.label_column in schema.names else None
    if config.label_column is not None and label_column is None:
        log.warning("Parquet source has no label column %r: images are unlabeled", config.label_column)
    columns = [config.image_column] + ([label_column] if label_column else [])
    ds = ray.data.read_parquet(paths, filesystem=filesystem, include_paths=True).select_columns([*columns, "path"])
    label_map, classes = None, []
    if label_column is not None:
        label_type = schema.field(label_column).type
        if pa.types.is_string(label_type) or pa.types.is_large_string(label_type):
            # One small column, read on the driver: cheaper than a distributed unique().
            names = pq.ParquetDataset(paths, filesystem=filesystem).read(columns=[label_column]).column(0)
            classes = sorted(str(v) for v in pc.unique(names).to_pylist() if v is not None)
            label_map = {name: k for k, name in enumerate(classes)}
        elif not pa.types.is_integer(label_type):
            raise StageInputError(
                f"Parquet label column {label_column!r} is {label_type}; use integers or strings, "
                "or set 'ingest.label_column: null'"
            )
    base = posixpath.dirname(source.root.rstrip("/")) if len(paths) == 1 else source.root.rstrip("/")
    ds = ds.map_batches(
        normalize_parquet,
        batch_format="pyarrow",
        fn_kwargs={"image_column": config.image_column, "label_column": label_column,
                   "label_map": label_map, "base": base},
    )
    return ds, classes


# --------------------------------------------------------------------------- the stage


@dataclass(frozen=True)
class IngestResult:
    images: pa.Table  # IMAGES_SCHEMA, sorted by id
    quarantine: pa.Table  # QUARANTINE_SCHEMA
    classes: list[str]
    duplicates: int


def _collect(ds) -> pa.Table:
    parts = [batch for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    return pa.concat_tables(parts).combine_chunks() if parts else _DECODED_SCHEMA.empty_table()


def ingest_table(store: Store, config: IngestConfig, source: Source) -> IngestResult:
    """Read, decode, quarantine, dedupe, limit and split: everything but the writing."""
    if source.kind == "digits":
        ds, classes = _digits_dataset(config.limit)
    elif source.kind == "folder":
        ds, classes = _folder_dataset(source, config.limit)
    else:
        ds, classes = _parquet_dataset(source, config)
    ds = ds.map_batches(
        decode_images, batch_format="pyarrow", batch_size=64,
        fn_kwargs={"image_size": config.image_size, "channels": config.channels},
    )
    rows = _collect(ds).sort_by([("id", "ascending"), ("label", "ascending"), ("path", "ascending")])

    bad_mask = pc.not_equal(rows["error"], "")
    bad = rows.filter(bad_mask)
    good = rows.filter(pc.invert(bad_mask))
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
    duplicates = int((~keep).sum())
    good = good.filter(pa.array(keep))
    if config.limit is not None:
        good = good.slice(0, config.limit)

    splits = [assign_split(i, config.test_fraction) for i in good["id"].to_pylist()]
    images = pa.table(
        {
            "id": good["id"],
            "split": pa.array(splits, pa.string()),
            "label": good["label"],
            "image": good["image"],
            "width": good["width"],
            "height": good["height"],
        },
        schema=IMAGES_SCHEMA,
    )
    quarantine = pa.table({"id": bad["id"], "path": bad["path"], "reason": bad["error"]}, schema=QUARANTINE_SCHEMA)
    return IngestResult(images, quarantine, classes, duplicates)


def num_classes_of(labels: pa.ChunkedArray) -> int:
    """max(label) + 1 over labelled rows; 0 when nothing is labelled."""
    top = pc.max(labels).as_py()
    return 0 if top is None or top < 0 else int(top) + 1


def run_ingest(store: Store, config: IngestConfig) -> Manifest:
    """Build (or reuse) the images table for ``config.source``; returns the committed manifest."""
    source = resolve_source(store, config.source)
    key_config = {**section_dict(config), "source_kind": source.kind, "source_fingerprint": source.fingerprint}

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        from workers.runtime import ensure_ray

        ensure_ray()
        result = ingest_table(store, config, source)
        # Named classes (folders, string labels, digits) count even when `limit` left one out.
        num_classes = len(result.classes) or num_classes_of(result.images["label"])
        metadata = {
            "fewstep.image_size": str(config.image_size),
            "fewstep.channels": str(config.channels),
            "fewstep.num_classes": str(num_classes),
            "fewstep.classes": json.dumps(result.classes),
            "fewstep.source_fingerprint": source.fingerprint,
        }
        writer.write_table("images", result.images, metadata=metadata)
        writer.write_table("quarantine", result.quarantine)
        splits = result.images["split"]
        n_test = int(pc.sum(pc.equal(splits, "test")).as_py() or 0)
        if result.quarantine.num_rows:
            log.warning("ingest: quarantined %d file(s), e.g. %s: %s", result.quarantine.num_rows,
                        result.quarantine["path"][0].as_py(), result.quarantine["reason"][0].as_py())
        return {
            "n_images": result.images.num_rows,
            "n_train": result.images.num_rows - n_test,
            "n_test": n_test,
            "num_classes": num_classes,
            "quarantined": result.quarantine.num_rows,
            "duplicates": result.duplicates,
            "image_size": config.image_size,
            "channels": config.channels,
            "source_kind": source.kind,
        }

    return run_stage(store, STAGE, key_config, [], build)
