"""User data as raw rows: an image folder (labels from sub-folders, or none) or a Parquet table.

Ids are deterministic: sha1 of the source-relative path for folders; sha1 of the image bytes
for Parquet (identical images collapse to one row, so a duplicate can never sit on both
sides of the split).

Labels. Folders: sorted sub-folder names -> 0..K-1. Parquet, checked on the driver over every
file before any image is read (:func:`parquet_columns`, :func:`parquet_labels`):

- every file must have the image column (binary, or a struct with ``bytes``) and either every
  file or none the label column, of one kind in all files: integers or strings;
- strings (or a dictionary of strings): sorted distinct names -> 0..K-1, the names are the classes;
- integers: null and -1 are "no label"; any other negative value is an error. Ids below
  :data:`MAX_CLASSES` are kept as they are (class 7 stays class 7, also when served);
  otherwise the sorted distinct values are renumbered 0..K-1 and recorded as the class names
  (``{0, 2_000_000_000}`` -> classes ``("0", "2000000000")``, not 2,000,000,001 classes);
- more than :data:`MAX_CLASSES` distinct classes is an error (a column of ids is not a label).
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import IngestConfig, StageInputError
from workers.sources import RAW_SCHEMA, blocks_for
from workers.sources.listing import Source, content_id

log = logging.getLogger("fewstep.ingest")

# The most classes a dataset may have: each is a row of the generator's label embedding and an
# output of the evaluation's classifier. ImageNet-21k's 21,841 fit; a column of unique ids does not.
MAX_CLASSES = 50_000
MISSING_LABEL = -1  # also what a null label becomes
SCHEMA_THREADS = 16  # files whose footers are read at once


def check_class_count(count: int, what: str, fix: str) -> None:
    """Refuse more than :data:`MAX_CLASSES` classes; ``what`` says where they come from, ``fix`` what to do."""
    if count > MAX_CLASSES:
        raise StageInputError(f"{what} gives {count:,} classes, more than fewstep's limit of {MAX_CLASSES:,}; {fix}")


def read_files(batch: pa.Table, fs: Any) -> pa.Table:
    """Ray Data UDF: fill the ``data`` column with each file's bytes; an unreadable file gets an error."""
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


def folder_classes(source: Source) -> tuple[bool, list[str]]:
    """(labelled, class names): a folder is labelled when any image sits in a sub-folder."""
    labelled = any("/" in f.rel for f in source.files)
    return labelled, sorted({f.rel.split("/", 1)[0] for f in source.files if "/" in f.rel}) if labelled else []


def folder_dataset(source: Source, limit: int | None, read: Collection[str] | None = None):
    """(raw rows, class names): first-level sub-folders are the classes (sorted -> 0..K-1).

    ``read``: the source-relative paths to read (an incremental ingest); the classes still come
    from every file of the source. None: every file."""
    import ray.data

    labelled, classes = folder_classes(source)
    check_class_count(
        len(classes),
        f"image folder {source.root!r} (one class per sub-folder)",
        "put the images of each class in one first-level sub-folder",
    )
    index = {name: k for k, name in enumerate(classes)}
    items = []
    wanted = None if read is None else set(read)
    for f in source.files:
        if wanted is not None and f.rel not in wanted:
            continue
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
    ds = ray.data.from_items(items, override_num_blocks=blocks_for(len(items)))
    ds = ds.map_batches(read_files, batch_format="pyarrow", fn_kwargs={"fs": source.fs}, batch_size=64)
    return ds, classes


def label_ids(values: list[Any], label_map: dict[Any, int] | None) -> list[int]:
    """A label column's values -> class ids: null and integer -1 -> -1, then ``label_map`` (or as is)."""
    ids = []
    for v in values:
        if v is None or (v == MISSING_LABEL and not isinstance(v, str)):
            ids.append(MISSING_LABEL)
        else:
            ids.append(int(v) if label_map is None else label_map[v])
    return ids


def normalize_parquet(
    batch: pa.Table, image_column: str, label_column: str | None, label_map: dict[Any, int] | None, base: str
) -> pa.Table:
    """Ray Data UDF: a batch of a user's Parquet rows -> raw rows (id from the image bytes, int label)."""
    column = batch[image_column]
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")  # Hugging Face datasets' Image feature
    data = column.to_pylist()
    if label_column is None:
        labels = [MISSING_LABEL] * len(data)
    else:
        labels = label_ids(batch[label_column].to_pylist(), label_map)
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
        schema=RAW_SCHEMA,
    )


@dataclass(frozen=True)
class ParquetColumns:
    """What every file of a Parquet source agrees on: its label column and that column's kind."""

    label_column: str | None  # None: unlabelled
    label_kind: Literal["int", "str"] | None


def _image_type_ok(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
    )


def _label_kind(t: pa.DataType) -> Literal["int", "str"] | None:
    if pa.types.is_dictionary(t):
        t = t.value_type
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    return None


def _map_files(fn, paths: list[str]) -> list[Any]:
    """``fn`` over every path, a few at a time (each is one small read: a footer or one column)."""
    if len(paths) == 1:
        return [fn(paths[0])]
    with ThreadPoolExecutor(max_workers=min(SCHEMA_THREADS, len(paths))) as pool:
        return list(pool.map(fn, paths))


def parquet_columns(paths: list[str], filesystem: Any, config: IngestConfig, rel: dict[str, str]) -> ParquetColumns:
    """Check the schema of EVERY file (not just the first): the image column, the label column and its kind.

    ``rel`` names each path as the user sees it, for the messages.
    """
    schemas = _map_files(lambda path: pq.read_schema(path, filesystem=filesystem), paths)
    with_labels = []
    for path, schema in zip(paths, schemas):
        if config.image_column not in schema.names:
            raise StageInputError(
                f"Parquet file {rel[path]!r} of source {config.source!r} has no column {config.image_column!r} "
                f"(columns: {schema.names}); set 'ingest.image_column' to the column of image bytes"
            )
        image_type = schema.field(config.image_column).type
        if not _image_type_ok(image_type):
            raise StageInputError(
                f"Parquet column {config.image_column!r} is {image_type} in {rel[path]!r}; it must hold encoded image "
                "bytes (binary, or a struct with a 'bytes' field)"
            )
        if config.label_column is not None and config.label_column in schema.names:
            with_labels.append((path, schema.field(config.label_column).type))
    if config.label_column is None or not with_labels:
        if config.label_column is not None:
            log.warning("Parquet source has no label column %r: images are unlabeled", config.label_column)
        return ParquetColumns(None, None)
    if len(with_labels) != len(paths):
        missing = next(path for path in paths if path not in dict(with_labels))
        raise StageInputError(
            f"Parquet file {rel[missing]!r} has no label column {config.label_column!r}, but {rel[with_labels[0][0]]!r} "
            "has one; give every file the column (null for unlabelled rows) or set 'ingest.label_column: null'"
        )
    kinds = {}
    for path, label_type in with_labels:
        kind = _label_kind(label_type)
        if kind is None:
            raise StageInputError(
                f"Parquet label column {config.label_column!r} is {label_type} in {rel[path]!r}; use integers or "
                "strings, or set 'ingest.label_column: null'"
            )
        kinds.setdefault(kind, (path, label_type))
    if len(kinds) > 1:
        (a, type_a), (b, type_b) = kinds["int"], kinds["str"]
        raise StageInputError(
            f"Parquet label column {config.label_column!r} is {type_a} in {rel[a]!r} but {type_b} in {rel[b]!r}; "
            "write every file's labels as one type (all integers or all strings)"
        )
    return ParquetColumns(config.label_column, next(iter(kinds)))


def parquet_labels(
    paths: list[str], filesystem: Any, columns: ParquetColumns, where: str
) -> tuple[dict[Any, int] | None, list[str]]:
    """(label map for :func:`label_ids` (None: ids as they are), class names) from every file's labels.

    One small column per file, read on the driver: cheaper than a distributed unique().
    """
    if columns.label_column is None:
        return None, []
    target = pa.int64() if columns.label_kind == "int" else pa.string()

    def distinct(path: str) -> pa.Array:
        values = pq.read_table(path, columns=[columns.label_column], filesystem=filesystem).column(0)
        return pc.unique(pc.cast(values, target) if values.type != target else values)

    try:
        values = pc.unique(pa.chunked_array(_map_files(distinct, paths), type=target)).drop_null().to_pylist()
    except pa.ArrowInvalid as error:  # e.g. a uint64 label beyond int64
        raise StageInputError(
            f"Parquet label column {columns.label_column!r} of {where!r} cannot be read as {target} class ids: {error}"
        ) from None
    column = repr(columns.label_column)
    if columns.label_kind == "str":
        classes = sorted(values)
        check_class_count(
            len(classes),
            f"Parquet label column {column} of {where!r}",
            "point 'ingest.label_column' at a column of class names, or set it to null",
        )
        return {name: k for k, name in enumerate(classes)}, classes
    negative = sorted(v for v in values if v < 0 and v != MISSING_LABEL)
    if negative:
        raise StageInputError(
            f"Parquet label column {column} of {where!r} holds negative labels {negative[:5]}; labels are class "
            f"ids >= 0, and null or {MISSING_LABEL} means 'no label': fix those rows, or set 'ingest.label_column: null'"
        )
    ids = sorted(v for v in values if v >= 0)
    check_class_count(
        len(ids),
        f"Parquet label column {column} of {where!r}",
        "point 'ingest.label_column' at a column of class ids, or set it to null",
    )
    if not ids or ids[-1] < MAX_CLASSES:
        return None, []  # class ids as they are: num_classes is max + 1
    log.warning(
        "Parquet labels of %r go up to %d: renumbering its %d distinct values 0..%d (kept as class names)",
        where,
        ids[-1],
        len(ids),
        len(ids) - 1,
    )
    return {v: k for k, v in enumerate(ids)}, [str(v) for v in ids]


def parquet_dataset(source: Source, config: IngestConfig, read: Collection[str] | None = None):
    """(raw rows, class names) of a Parquet file or folder with a column of encoded images.

    ``read``: the source-relative paths whose rows to read (an incremental ingest); the columns
    are checked and the classes found over every file. None: every file."""
    import ray.data

    filesystem = source.pa_fs
    paths = [f.path for f in source.files]
    columns = parquet_columns(paths, filesystem, config, {f.path: f.rel for f in source.files})
    label_map, classes = parquet_labels(paths, filesystem, columns, config.source)
    selected = [config.image_column] + ([columns.label_column] if columns.label_column else [])
    if read is not None:
        wanted = set(read)
        paths = [f.path for f in source.files if f.rel in wanted]
    ds = ray.data.read_parquet(paths, filesystem=filesystem, include_paths=True).select_columns([*selected, "path"])
    base = posixpath.dirname(source.root.rstrip("/")) if len(source.files) == 1 else source.root.rstrip("/")
    ds = ds.map_batches(
        normalize_parquet,
        batch_format="pyarrow",
        fn_kwargs={
            "image_column": config.image_column,
            "label_column": columns.label_column,
            "label_map": label_map,
            "base": base,
        },
    )
    return ds, classes
