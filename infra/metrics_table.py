"""The evaluation's metrics table: its schema, and the readers promotion, serving and the CLI use.

The evaluate stage writes one row per (model, sampler, steps, guidance) plus two reference rows
(sampler :data:`REFERENCE`: :data:`FLOOR`, real train images against the test split, and
:data:`CEILING`, their VAE reconstructions). ``stage_key`` is the scored manifest's ref.
Every FID and KID carries its interval: ``fid_low``/``fid_high`` a basic bootstrap interval
(paired: every row resamples the same reference rows in draw b), ``kid_low``/``kid_high``
over random subsets. The FID draws themselves are the :data:`DRAWS` table, so two rows of one
evaluation can be compared on their paired difference. Readers go through this module, never
through the evaluate stage.

A model whose sampler takes classifier-free guidance has one row per scale of
``evaluate.guidance``; "best" always ranges over samplers, steps and guidance alike, and a
lookup at a given step count returns its best-guidance row unless a scale is named.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from infra.manifest import Manifest

TABLE = "metrics"  # the file name in an evaluate manifest
DRAWS = "fid_draws"  # the rows' paired bootstrap FID draws: (row_key, draws (B,))
COLUMNS = (
    "model",
    "stage_key",
    "sampler",
    "steps",
    "nfe",
    "guidance",
    "n",
    "extractor",
    "fid",
    "fid_low",
    "fid_high",
    "kid",
    "kid_low",
    "kid_high",
    "precision",
    "recall",
    "class_accuracy",
    "seconds_per_image",
)
SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("stage_key", pa.string()),
        ("sampler", pa.string()),
        ("steps", pa.int64()),
        ("nfe", pa.int64()),
        ("guidance", pa.float64()),
        ("n", pa.int64()),
        ("extractor", pa.string()),
        ("fid", pa.float64()),
        ("fid_low", pa.float64()),
        ("fid_high", pa.float64()),
        ("kid", pa.float64()),
        ("kid_low", pa.float64()),
        ("kid_high", pa.float64()),
        ("precision", pa.float64()),
        ("recall", pa.float64()),
        ("class_accuracy", pa.float64()),
        ("seconds_per_image", pa.float64()),
    ]
)
REFERENCE = "reference"  # the sampler column of the two reference rows
FLOOR, CEILING = "real-train", "vae-recon"

Row = dict[str, Any]


def rows_table(rows: Sequence[Row]) -> pa.Table:
    return pa.Table.from_pylist([{c: row.get(c) for c in COLUMNS} for row in rows], schema=SCHEMA)


def row_key(row: Row) -> str:
    """A row's name in the draws table: ``model|sampler|steps|guidance`` (reference rows, which have
    no guidance: ``model|sampler|steps``), so rows at different scales never collide."""
    key = f"{row['model']}|{row['sampler']}|{row['steps']}"
    return key if row.get("guidance") is None else f"{key}|{row['guidance']:g}"


def row_label(row: Row) -> str:
    """How reports name a row's setting: ``euler 8 steps at guidance 2``."""
    steps = f"{row['steps']} step{'s' if row['steps'] != 1 else ''}"
    at = "" if row.get("guidance") is None else f" at guidance {row['guidance']:g}"
    return f"{row['sampler']} {steps}{at}"


def read_rows(store, manifest: Manifest) -> list[Row]:
    """The metrics table of an evaluate manifest as rows (reference rows first)."""
    return store.read_table(manifest, TABLE).to_pylist()


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def row_at(
    rows: Sequence[Row], model_ref: str, steps: int, sampler: str | None = None, guidance: float | None = None
) -> Row | None:
    """The row of ``model_ref`` at ``steps``: the lowest FID over samplers and guidance scales,
    unless a sampler or a scale is named."""
    found = [
        r
        for r in rows
        if r["stage_key"] == model_ref
        and r["steps"] == steps
        and (sampler is None or r["sampler"] == sampler)
        and (guidance is None or r["guidance"] == guidance)
        and finite(r["fid"])
    ]
    return min(found, key=lambda r: r["fid"]) if found else None


def fid_at(
    rows: Sequence[Row], model_ref: str, steps: int, sampler: str | None = None, guidance: float | None = None
) -> float | None:
    """The FID of ``model_ref`` at ``steps`` (the best over samplers and scales unless named); None if not scored."""
    row = row_at(rows, model_ref, steps, sampler, guidance)
    return None if row is None else row["fid"]


def read_draws(store, manifest: Manifest) -> dict[str, list[float]]:
    """``row_key`` -> the row's FID bootstrap draws (paired across the rows of one evaluation)."""
    if DRAWS not in manifest.files:
        return {}
    table = store.read_table(manifest, DRAWS)
    return dict(zip(table.column("row").to_pylist(), table.column("draws").to_pylist()))


def measured_as(rows: Sequence[Row]) -> set[tuple[str, int]]:
    """(extractor, n) of a table: FIDs compare only between tables measured the same way."""
    return {(r["extractor"], r["n"]) for r in rows}


def generated(rows: Sequence[Row]) -> list[Row]:
    """The rows of generated images with a finite FID (no reference rows)."""
    return [r for r in rows if r["sampler"] != REFERENCE and finite(r["fid"])]


def reference_row(rows: Sequence[Row], model: str) -> Row | None:
    return next((r for r in rows if r["sampler"] == REFERENCE and r["model"] == model), None)


def reference_fid(rows: Sequence[Row], model: str) -> float | None:
    row = reference_row(rows, model)
    return None if row is None else row["fid"]


def best_row(
    rows: Sequence[Row],
    model: str | None = None,
    steps: int | None = None,
    stage: str | None = None,
    nfe: int | None = None,
) -> Row | None:
    """The lowest-FID generated row (over samplers, steps and guidance scales), optionally of one
    model, step count, stage or NFE."""
    chosen = [
        r
        for r in generated(rows)
        if (model is None or r["model"] == model)
        and (steps is None or r["steps"] == steps)
        and (stage is None or stage_of(r) == stage)
        and (nfe is None or r["nfe"] == nfe)
    ]
    return min(chosen, key=lambda r: r["fid"]) if chosen else None


def best_guidance(rows: Sequence[Row], model_ref: str) -> float | None:
    """The guidance scale of ``model_ref``'s best row (over samplers and steps); None if not scored."""
    found = [r for r in generated(rows) if r["stage_key"] == model_ref and r["guidance"] is not None]
    return min(found, key=lambda r: r["fid"])["guidance"] if found else None


def best_by_model(rows: Sequence[Row]) -> dict[str, Row]:
    """Each model's best row (over samplers, steps and guidance), by display name in the table's order."""
    return {model: best_row(rows, model=model) for model in dict.fromkeys(r["model"] for r in generated(rows))}


def best_by_steps(rows: Sequence[Row]) -> dict[int, Row]:
    return {s: best_row(rows, steps=s) for s in sorted({r["steps"] for r in generated(rows)})}


def stage_of(row: Row) -> str:
    return str(row["stage_key"]).split("/", 1)[0]
