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
