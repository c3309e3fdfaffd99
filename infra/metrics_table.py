"""The evaluation's metrics table: its schema, and the readers promotion, serving and the CLI use.

The evaluate stage writes one row per (model, sampler, steps) plus two reference rows
(sampler :data:`REFERENCE`: :data:`FLOOR`, real train images against the test split, and
:data:`CEILING`, their VAE reconstructions). ``stage_key`` is the scored manifest's ref.
Readers go through this module, never through the evaluate stage.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pyarrow as pa

from infra.manifest import Manifest

TABLE = "metrics"  # the file name in an evaluate manifest
COLUMNS = ("model", "stage_key", "sampler", "steps", "nfe", "guidance", "n", "extractor",
           "fid", "precision", "recall", "class_accuracy", "seconds_per_image")
SCHEMA = pa.schema([
    ("model", pa.string()), ("stage_key", pa.string()), ("sampler", pa.string()), ("steps", pa.int64()),
    ("nfe", pa.int64()), ("guidance", pa.float64()), ("n", pa.int64()), ("extractor", pa.string()),
    ("fid", pa.float64()), ("precision", pa.float64()), ("recall", pa.float64()),
    ("class_accuracy", pa.float64()), ("seconds_per_image", pa.float64()),
])
REFERENCE = "reference"  # the sampler column of the two reference rows
FLOOR, CEILING = "real-train", "vae-recon"

Row = dict[str, Any]


def rows_table(rows: Sequence[Row]) -> pa.Table:
    return pa.Table.from_pylist([{c: row[c] for c in COLUMNS} for row in rows], schema=SCHEMA)


def read_rows(store, manifest: Manifest) -> list[Row]:
    """The metrics table of an evaluate manifest as rows (reference rows first)."""
    return store.read_table(manifest, TABLE).to_pylist()


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def fid_at(rows: Sequence[Row], model_ref: str, steps: int, sampler: str | None = None) -> float | None:
    """The FID of ``model_ref`` at ``steps`` (the best over samplers unless one is named); None if not scored."""
    fids = [r["fid"] for r in rows if r["stage_key"] == model_ref and r["steps"] == steps
            and (sampler is None or r["sampler"] == sampler) and finite(r["fid"])]
    return min(fids) if fids else None


def measured_as(rows: Sequence[Row]) -> set[tuple[str, int]]:
    """(extractor, n) of a table: FIDs compare only between tables measured the same way."""
    return {(r["extractor"], r["n"]) for r in rows}
