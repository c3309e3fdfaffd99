"""The evaluation's metrics table: one typed :class:`Row`, how it is written and read, and how rows are ranked.

The evaluate stage writes one row per (model, sampler, steps, guidance) plus two reference rows
(sampler :data:`REFERENCE`: :data:`FLOOR`, real train images against the test split, and
:data:`CEILING`, their VAE reconstructions). ``stage_key`` is the scored manifest's ref.
Every FID carries a basic bootstrap interval ``fid_low``/``fid_high`` (paired: every row
resamples the same reference rows in draw b) and ``fid_corrected``, the bias-corrected FID that
interval is built around (:attr:`models.metrics.Interval.corrected`; it always lies inside,
where the plug-in ``fid`` may not); KID carries ``kid_low``/``kid_high`` over random subsets.
The FID draws themselves are the :data:`DRAWS` table, so two rows of one evaluation can be
compared on their paired difference.

Ranking reads the plug-in ``fid``: every row of one table shares its n and feature space, and
the promotion gate compares rows on their paired draws, not on either point value. A model
whose sampler takes classifier-free guidance has one row per scale of ``evaluate.guidance``;
"best" ranges over samplers, steps and guidance alike, and a lookup at a given step count
returns its best-guidance row unless a scale is named. Promotion, the probe, serving, the
report and the CLI all rank through this module.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from infra.manifest import Manifest

TABLE = "metrics"  # the file name in an evaluate manifest
DRAWS = "fid_draws"  # the rows' paired bootstrap FID draws: (row_key, draws (B,))
REFERENCE = "reference"  # the sampler column of the two reference rows
FLOOR, CEILING = "real-train", "vae-recon"


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Row:
    """One measured setting of one model (or a reference row), as one table row holds it."""

    model: str  # display name: base, reflow-1, consistency; or FLOOR / CEILING
    stage_key: str  # the scored manifest's ref (stage/key)
    sampler: str  # a name of models.sampling.SAMPLERS, or REFERENCE
    steps: int  # 0 for reference rows
    nfe: int  # network passes per image (a guided step costs two)
    guidance: float | None = None  # None for reference rows
    n: int = 0  # images scored
    extractor: str = ""  # the feature space's name
    fid: float | None = None  # the plug-in FID on all the data (ranked on)
    fid_low: float | None = None  # basic bootstrap interval of the population FID
    fid_high: float | None = None
    fid_corrected: float | None = None  # the bias-corrected FID the interval is built around
    kid: float | None = None  # mean unbiased MMD^2 over subsets
    kid_low: float | None = None
    kid_high: float | None = None
    precision: float | None = None
    recall: float | None = None
    class_accuracy: float | None = None  # None: no classifier
    seconds_per_image: float | None = None

    @property
    def is_reference(self) -> bool:
        return self.sampler == REFERENCE

    @property
    def stage(self) -> str:
        """The stage of the scored manifest (base, reflow, consistency, ddpm; ingest or vae for references)."""
        return str(self.stage_key).split("/", 1)[0]

    @property
    def fid_centre(self) -> float | None:
        """The FID shown with its interval: ``fid_corrected``, which the interval is built around (so it
        always lies inside); the plug-in ``fid`` for a row measured without one (an older table)."""
        return self.fid_corrected if finite(self.fid_corrected) else self.fid

    @property
    def key(self) -> str:
        """The row's name in the draws table: ``model|sampler|steps|guidance`` (reference rows, which have
        no guidance: ``model|sampler|steps``), so rows at different scales never collide."""
        key = f"{self.model}|{self.sampler}|{self.steps}"
        return key if self.guidance is None else f"{key}|{self.guidance:g}"

    @property
    def label(self) -> str:
        """How reports name a row's setting: ``euler 8 steps at guidance 2``."""
        steps = f"{self.steps} step{'s' if self.steps != 1 else ''}"
        at = "" if self.guidance is None else f" at guidance {self.guidance:g}"
        return f"{self.sampler} {steps}{at}"

    @property
    def tag(self) -> str:
        """``base (euler@8, w=2)``: the model and its setting, in one short name."""
        scale = "" if self.guidance is None else f", w={self.guidance:g}"
        return f"{self.model} ({self.sampler}@{self.steps}{scale})"

    def to_record(self) -> dict[str, Any]:
        """The row as the table's columns (:data:`COLUMNS`, in order)."""
        return {c: getattr(self, c) for c in COLUMNS}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> Row:
        """A row from a table record; columns a table of an older fewstep lacks (``fid_corrected``) read as None."""
        missing = [c for c in REQUIRED if record.get(c) is None]
        if missing:
            raise ValueError(
                f"a metrics row has no {missing} (got {dict(record)}); it was not written by the evaluate stage"
            )
        values = {c: record.get(c) for c in COLUMNS}
        for c in ("steps", "nfe", "n"):
            values[c] = int(values[c]) if values[c] is not None else 0
        return cls(**values)


COLUMNS = tuple(f.name for f in dataclasses.fields(Row))
REQUIRED = ("model", "stage_key", "sampler", "steps", "nfe")
_TYPES = {"str": pa.string(), "int": pa.int64()}
SCHEMA = pa.schema([(f.name, _TYPES.get(str(f.type), pa.float64())) for f in dataclasses.fields(Row)])


# --------------------------------------------------------------------------- writing and reading


def rows_table(rows: Sequence[Row]) -> pa.Table:
    return pa.Table.from_pylist([row.to_record() for row in rows], schema=SCHEMA)


def read_rows(store, manifest: Manifest) -> list[Row]:
    """The metrics table of an evaluate manifest as rows (reference rows first)."""
    return [Row.from_record(record) for record in store.read_table(manifest, TABLE).to_pylist()]


def read_draws(store, manifest: Manifest) -> dict[str, list[float]]:
    """:attr:`Row.key` -> the row's FID bootstrap draws (paired across the rows of one evaluation)."""
    if DRAWS not in manifest.files:
        return {}
    table = store.read_table(manifest, DRAWS)
    return dict(zip(table.column("row").to_pylist(), table.column("draws").to_pylist()))


# --------------------------------------------------------------------------- selecting and ranking


def measured_as(rows: Sequence[Row]) -> set[tuple[str, int]]:
    """(extractor, n) of a table: FIDs compare only between tables measured the same way."""
    return {(r.extractor, r.n) for r in rows}


def models(rows: Sequence[Row]) -> list[str]:
    """The display names of the generated rows' models, in the table's order (with or without a finite FID)."""
    return list(dict.fromkeys(r.model for r in rows if not r.is_reference))


def generated(rows: Sequence[Row]) -> list[Row]:
    """The rows of generated images with a finite FID (no reference rows): what "best" ranges over."""
    return [r for r in rows if not r.is_reference and finite(r.fid)]


def reference_row(rows: Sequence[Row], model: str) -> Row | None:
    """The :data:`FLOOR` or :data:`CEILING` row of a table."""
    return next((r for r in rows if r.is_reference and r.model == model), None)


def reference_fid(rows: Sequence[Row], model: str) -> float | None:
    row = reference_row(rows, model)
    return None if row is None else row.fid


def lowest_fid(rows: Sequence[Row]) -> Row | None:
    """The row with the lowest finite FID (the first of equals); None if none has one."""
    return min((r for r in rows if finite(r.fid)), key=lambda r: r.fid, default=None)


def best_row(
    rows: Sequence[Row],
    model: str | None = None,
    steps: int | None = None,
    stage: str | None = None,
    nfe: int | None = None,
) -> Row | None:
    """The lowest-FID generated row (over samplers, steps and guidance scales), optionally of one
    model, step count, stage or NFE."""
    return lowest_fid(
        [
            r
            for r in generated(rows)
            if (model is None or r.model == model)
            and (steps is None or r.steps == steps)
            and (stage is None or r.stage == stage)
            and (nfe is None or r.nfe == nfe)
        ]
    )


def best_by_model(rows: Sequence[Row]) -> dict[str, Row | None]:
    """Each model's best row (over samplers, steps and guidance), by display name in the table's
    order; None for a model without a finite FID (a diverged sampler), so it is named, not dropped."""
    return {model: best_row(rows, model=model) for model in models(rows)}


def best_by_steps(rows: Sequence[Row]) -> dict[int, Row]:
    """The best row at each evaluated step count, over models."""
    return {s: best_row(rows, steps=s) for s in sorted({r.steps for r in generated(rows)})}


def row_at(
    rows: Sequence[Row], model_ref: str, steps: int, sampler: str | None = None, guidance: float | None = None
) -> Row | None:
    """The row of ``model_ref`` at ``steps``: the lowest FID over samplers and guidance scales,
    unless a sampler or a scale is named."""
    return lowest_fid(
        [
            r
            for r in rows
            if r.stage_key == model_ref
            and r.steps == steps
            and (sampler is None or r.sampler == sampler)
            and (guidance is None or r.guidance == guidance)
        ]
    )


def fid_at(
    rows: Sequence[Row], model_ref: str, steps: int, sampler: str | None = None, guidance: float | None = None
) -> float | None:
    """The FID of ``model_ref`` at ``steps`` (the best over samplers and scales unless named); None if not scored."""
    row = row_at(rows, model_ref, steps, sampler, guidance)
    return None if row is None else row.fid


def best_guidance(rows: Sequence[Row], model_ref: str) -> float | None:
    """The guidance scale of ``model_ref``'s best row (over samplers and steps); None if not scored."""
    best = lowest_fid([r for r in generated(rows) if r.stage_key == model_ref and r.guidance is not None])
    return None if best is None else best.guidance
