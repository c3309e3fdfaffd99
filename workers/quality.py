"""The quality bars: how each few-step model compares with the base model, on excess over the floor.

    ratio = (FID_row - FID_floor) / (FID_baseline - FID_floor)

FID at a finite n is mostly small-sample bias near the floor (real images disjoint from the
reference, scored against it), so a ratio of plain FIDs flatters every model; the excess
over the floor is what a model adds. Each ratio carries a bootstrap interval from the rows'
paired draws (:func:`models.metrics.excess_ratio`): the floor, the baseline and the row were
resampled on the same reference rows in every draw. A bar is met when its interval's upper
end is at or below the bar; a difference inside its interval is not a result.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.metrics_table import FLOOR, Row, best_row, reference_row, row_key, stage_of
from models.metrics import Draws, excess_ratio

# name -> (numerator, denominator, the bar it is held to: ratio <= bar)
BARS = {
    "consistency@1 / base best": 1.3,
    "best consistency@2-4 / consistency@1": 1.0,
    "best reflow@2 / base best": 1.2,
    "consistency@1 / base@1": 0.25,
}


@dataclass(frozen=True)
class Ratio:
    """(excess of numerator) / (excess of denominator) over the floor: below 1 the numerator is better."""

    name: str
    numerator: str  # e.g. "consistency (consistency@1, w=1)"
    denominator: str
    value: float | None
    low: float | None = None
    high: float | None = None
    bar: float | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        if self.value is None or self.bar is None:
            return "–"
        if self.high is not None and self.high <= self.bar:
            return "met"
        if self.low is not None and self.low > self.bar:
            return "not met"
        return "met" if self.value <= self.bar and self.high is None else "within interval of the bar"

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "bar": self.bar,
            "verdict": self.verdict,
            "numerator": self.numerator,
            "denominator": self.denominator,
        }


def label(row: Row | None) -> str:
    """``base (euler@8, w=2)``: a row's model and setting, its guidance scale included."""
    if row is None:
        return "–"
    scale = "" if row.get("guidance") is None else f", w={row['guidance']:g}"
    return f"{row['model']} ({row['sampler']}@{row['steps']}{scale})"


def excess(
    name: str, top: Row | None, bottom: Row | None, rows: Sequence[Row], draws: Mapping[str, Draws] | None, level: float
) -> Ratio:
    bar = BARS.get(name)
    floor = reference_row(rows, FLOOR)
    if top is None or bottom is None or floor is None:
        return Ratio(name, label(top), label(bottom), None, bar=bar, note="a model or the floor was not evaluated")
    denominator = bottom["fid"] - floor["fid"]
    if not denominator > 0:
        return Ratio(
            name,
            label(top),
            label(bottom),
            None,
            bar=bar,
            note="the denominator is not above the floor: it cannot be told from real data",
        )
    value = (top["fid"] - floor["fid"]) / denominator
    keys = (row_key(top), row_key(bottom), row_key(floor))
    if draws is None or any(k not in draws for k in keys):
        return Ratio(name, label(top), label(bottom), value, bar=bar, note="no paired draws: no interval")
    ratio = excess_ratio(draws[keys[0]], draws[keys[1]], draws[keys[2]], level)
    return Ratio(name, label(top), label(bottom), ratio.value, ratio.low, ratio.high, bar)


def quality_ratios(rows: Sequence[Row], draws: Mapping[str, Draws] | None = None, level: float = 0.95) -> list[Ratio]:
    """The issue's quality bars, found by the stage of each row's model (not its display name).

    "best" and "@k" range over samplers and guidance scales; "base@1" is the base model at one
    network pass (NFE 1: guidance 1, no doubled batch), the cost of the student's one step.

    When an evaluation holds two consistency students (the run's candidate and the served model it
    must beat), every consistency bar reads the candidate's rows only: the first student in the
    table, as the pipeline lists the run's own generators before the served one."""
    base_best = best_row(rows, stage="base")
    students = [r for r in rows if r.get("stage_key") and stage_of(r) == "consistency"]
    candidate = [r for r in students if r["stage_key"] == students[0]["stage_key"]] if students else []
    consistency_1 = best_row(candidate, steps=1)
    multistep = [r for r in (best_row(candidate, steps=s) for s in (2, 3, 4)) if r is not None]
    consistency_multi = min(multistep, key=lambda r: r["fid"], default=None)
    return [
        excess("consistency@1 / base best", consistency_1, base_best, rows, draws, level),
        excess("best consistency@2-4 / consistency@1", consistency_multi, consistency_1, rows, draws, level),
        excess("best reflow@2 / base best", best_row(rows, stage="reflow", steps=2), base_best, rows, draws, level),
        excess(
            "consistency@1 / base@1", consistency_1, best_row(rows, stage="base", steps=1, nfe=1), rows, draws, level
        ),
    ]
