"""User data as raw rows: an image folder (labels from sub-folders, or none) or a Parquet table.

Ids are deterministic: sha1 of the source-relative path for folders; sha1 of the image bytes
for Parquet (identical images collapse to one row, so a duplicate can never sit on both
sides of the split).
"""

from __future__ import annotations

import logging
import posixpath
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from infra.config import IngestConfig, StageInputError
from workers.sources import RAW_SCHEMA, blocks_for
from workers.sources.listing import Source, content_id

log = logging.getLogger("fewstep.ingest")


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


def folder_dataset(source: Source, limit: int | None):
    """(raw rows, class names): first-level sub-folders are the classes (sorted -> 0..K-1)."""
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
    ds = ray.data.from_items(items, override_num_blocks=blocks_for(len(items)))
    ds = ds.map_batches(read_files, batch_format="pyarrow", fn_kwargs={"fs": source.fs}, batch_size=64)
    return ds, classes


def normalize_parquet(
    batch: pa.Table, image_column: str, label_column: str | None, label_map: dict[str, int] | None, base: str
) -> pa.Table:
    """Ray Data UDF: a batch of a user's Parquet rows -> raw rows (id from the image bytes, int label)."""
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
        schema=RAW_SCHEMA,
    )


def parquet_dataset(source: Source, config: IngestConfig):
    """(raw rows, class names) of a Parquet file or folder with a column of encoded images."""
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
