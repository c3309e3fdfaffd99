"""Parquet schemas of the tables stages hand each other (other than tensor tables, see infra.tables)."""

from __future__ import annotations

import pyarrow as pa

# The ingest stage's images table, sorted by id: one PNG per row.
IMAGES_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),  # "train" | "test"
        ("label", pa.int64()),  # 0..K-1, or -1 for unlabelled
        ("image", pa.binary()),  # PNG, mode L or RGB, image_size x image_size
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

# Files the ingest stage could not use, and why.
QUARANTINE_SCHEMA = pa.schema([("id", pa.string()), ("path", pa.string()), ("reason", pa.string())])

# Beside each images part, a part of the same name with what a later run needs to tell whether a
# row is still the same without reading its image (workers.incremental): the digest is the sha1
# of the stored PNG.
INDEX_SCHEMA = pa.schema([("id", pa.string()), ("split", pa.string()), ("label", pa.int64()), ("digest", pa.string())])

# The source files an ingest read (path relative to the source, size, mtime or ETag): what the
# next run on the same source compares its listing with.
SOURCE_FILES_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("version", pa.string())])
