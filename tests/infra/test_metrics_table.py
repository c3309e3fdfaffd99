"""The evaluation table's lookups: rows at several guidance scales never collide, and "best"
ranges over samplers, steps and guidance."""

from __future__ import annotations

from infra.metrics_table import (
    COLUMNS,
    FLOOR,
    REFERENCE,
    best_by_model,
    best_guidance,
    best_row,
    fid_at,
    row_at,
    row_key,
    row_label,
)


def row(model: str, sampler: str, steps: int, guidance: float | None, fid: float) -> dict:
    values = dict.fromkeys(COLUMNS)
    values.update(model=model, stage_key=f"{model}/k", sampler=sampler, steps=steps, guidance=guidance, fid=fid)
    return values


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
    assert (best["sampler"], best["steps"], best["guidance"]) == ("euler", 8, 2.0)
    assert row_label(best) == "euler 8 steps at guidance 2"
    assert best_guidance(ROWS, "base/k") == 2.0 and best_guidance(ROWS, "consistency/k") == 2.0
    assert best_guidance(ROWS, "reflow/k") is None
    assert {m: r["fid"] for m, r in best_by_model(ROWS).items()} == {"base": 40.0, "consistency": 50.0}


def test_a_lookup_at_given_steps_returns_the_best_scale_unless_one_is_named():
    assert row_at(ROWS, "base/k", 2)["guidance"] == 2.0
    assert row_at(ROWS, "base/k", 8, "heun")["guidance"] == 4.0
    assert fid_at(ROWS, "base/k", 8, "euler", guidance=4.0) == 55.0
    assert fid_at(ROWS, "base/k", 8, "euler", guidance=1.0) == 70.0
    assert row_at(ROWS, "base/k", 2, guidance=4.0) is None


def test_rows_at_different_scales_have_different_draw_keys():
    keys = [row_key(r) for r in ROWS]
    assert len(set(keys)) == len(keys)
    assert row_key(ROWS[0]) == f"{FLOOR}|{REFERENCE}|0" and row_key(ROWS[4]) == "base|euler|8|2"
