"""Where ingest reads images from: the built-in sets, an image folder, or a Parquet table.

Each source is listed and fingerprinted on the driver (:func:`workers.sources.listing.resolve_source`)
and read as a Ray Dataset of raw rows (:data:`RAW_SCHEMA`): an id, where it came from, a label
(-1: none), the encoded bytes, and an error ("" while the row is still in the running).
"""

from __future__ import annotations

import pyarrow as pa

RAW_SCHEMA = pa.schema(
    [("id", pa.string()), ("path", pa.string()), ("label", pa.int64()), ("data", pa.binary()), ("error", pa.string())]
)
ROWS_PER_BLOCK = 256  # images per Ray Data block when we create the blocks ourselves


def blocks_for(n: int) -> int:
    return max(1, -(-n // ROWS_PER_BLOCK))
