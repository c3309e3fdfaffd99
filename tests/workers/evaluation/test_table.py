"""The evaluation table: one typed row written and read through Parquet (old tables included), and
its lookups: rows at several guidance scales never collide, and "best" ranges over samplers,
steps and guidance."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from workers.evaluation.table import (
    COLUMNS,
    FLOOR,
    REFERENCE,
    SCHEMA,
    TABLE,
    Row,
    best_by_model,
    best_guidance,
    best_row,
    fid_at,
    read_rows,
    row_at,
    rows_table,
)


def row(model: str, sampler: str, steps: int, guidance: float | None, fid: float) -> Row:
    return Row(model, f"{model}/k", sampler, steps, steps, guidance, fid=fid)


ROWS = [
    row(FLOOR, REFERENCE, 0, None, 3.0),
    row("base", "euler", 2, 1.0, 90.0),
    row("base", "euler", 2, 2.0, 60.0),
    row("base", "euler", 8, 1.0, 70.0),
    row("base", "euler", 8, 2.0, 40.0),  # the base model's best: 8 steps at guidance 2
    row("base", "euler", 8, 4.0, 55.0),
    row("base", "heun", 8, 4.0, 45.0),
    row("consistency", "consistency", 1, 2.0, 50.0),
]


def test_best_ranges_over_steps_samplers_and_guidance():
    best = best_row(ROWS, model="base")
    assert (best.sampler, best.steps, best.guidance) == ("euler", 8, 2.0)
    assert best.label == "euler 8 steps at guidance 2" and best.tag == "base (euler@8, w=2)"
    assert best_guidance(ROWS, "base/k") == 2.0 and best_guidance(ROWS, "consistency/k") == 2.0
    assert best_guidance(ROWS, "reflow/k") is None
    assert {m: r.fid for m, r in best_by_model(ROWS).items()} == {"base": 40.0, "consistency": 50.0}


def test_a_model_without_a_finite_fid_is_named_not_dropped():
    diverged = [*ROWS, row("reflow-1", "euler", 2, 1.0, math.nan)]
    assert list(best_by_model(diverged)) == ["base", "consistency", "reflow-1"]
    assert best_by_model(diverged)["reflow-1"] is None
    assert best_row(diverged).model == "base"  # NaN never wins


def test_a_lookup_at_given_steps_returns_the_best_scale_unless_one_is_named():
    assert row_at(ROWS, "base/k", 2).guidance == 2.0
    assert row_at(ROWS, "base/k", 8, "heun").guidance == 4.0
    assert fid_at(ROWS, "base/k", 8, "euler", guidance=4.0) == 55.0
    assert fid_at(ROWS, "base/k", 8, "euler", guidance=1.0) == 70.0
    assert row_at(ROWS, "base/k", 2, guidance=4.0) is None


def test_rows_at_different_scales_have_different_draw_keys():
    keys = [r.key for r in ROWS]
    assert len(set(keys)) == len(keys)
    assert ROWS[0].key == f"{FLOOR}|{REFERENCE}|0" and ROWS[4].key == "base|euler|8|2"


class TableStore:
    """Just enough of a store to read a metrics table: ``read_table`` of the one table it holds."""

    def __init__(self, table: pa.Table):
        self.table = table

    def read_table(self, manifest, name):
        assert name == TABLE
        return self.table


def test_a_row_round_trips_through_the_parquet_table(tmp_path):
    full = Row(
        "base", "base/k", "euler", 4, 8, 2.0, 64, "features/f", 40.0, 35.0, 47.0, 41.0, 0.01, 0.005, 0.02,
        0.6, 0.5, 0.8, 0.003,
    )  # fmt: skip
    table = rows_table([full, ROWS[0]])
    assert table.schema == SCHEMA and tuple(table.column_names) == COLUMNS
    import pyarrow.parquet as pq

    pq.write_table(table, tmp_path / "metrics.parquet")  # readable without fewstep, through a real file
    assert read_rows(TableStore(pq.read_table(tmp_path / "metrics.parquet")), None) == [full, ROWS[0]]


OLD_SCHEMA = pa.schema(  # the table as fewstep wrote it before fid_corrected: existing stores hold it
    [("model", pa.string()), ("stage_key", pa.string()), ("sampler", pa.string())]
    + [(c, pa.int64()) for c in ("steps", "nfe")]
    + [("guidance", pa.float64()), ("n", pa.int64()), ("extractor", pa.string())]
    + [(c, pa.float64()) for c in ("fid", "fid_low", "fid_high", "kid", "kid_low", "kid_high")]
    + [(c, pa.float64()) for c in ("precision", "recall", "class_accuracy", "seconds_per_image")]
)


def test_every_old_column_keeps_its_name_and_type_and_the_new_one_is_a_nullable_float():
    assert [SCHEMA.field(f.name) for f in OLD_SCHEMA] == list(OLD_SCHEMA)
    assert set(SCHEMA.names) - set(OLD_SCHEMA.names) == {"fid_corrected"}
    assert SCHEMA.field("fid_corrected").type == pa.float64() and SCHEMA.field("fid_corrected").nullable


def test_a_table_written_before_the_corrected_fid_column_still_reads():
    old = pa.Table.from_pylist([{c: getattr(ROWS[4], c) for c in OLD_SCHEMA.names}], schema=OLD_SCHEMA)
    (read,) = read_rows(TableStore(old), None)
    assert read == ROWS[4] and read.fid_corrected is None and read.fid_centre == 40.0


def test_a_table_that_is_not_a_metrics_table_is_named():
    with pytest.raises(ValueError, match=r"no \['stage_key', 'sampler', 'steps', 'nfe'\]"):
        read_rows(TableStore(pa.Table.from_pylist([{"model": "base"}])), None)
