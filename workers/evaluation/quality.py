"""The quality bars: how each few-step model compares with the base model, on excess over the floor.

    ratio = (FID_row - FID_floor) / (FID_baseline - FID_floor)

FID at a finite n is mostly small-sample bias near the floor (real images disjoint from the
reference, scored against it), so a ratio of plain FIDs flatters every model; the excess
over the floor is what a model adds. Each ratio carries a bootstrap interval from the rows'
paired draws (:func:`models.metrics.excess_ratio`): the floor, the baseline and the row were
resampled on the same reference rows in every draw. Like a FID, a ratio is shown as the
bias-corrected value its basic interval is built around (``corrected``), with the plug-in
ratio beside it. A bar is met when its interval's upper end is at or below the bar; a
difference inside its interval is not a result.

The absolute bar (:func:`shortfalls`, :func:`learned_verdict`) asks a different question of one
model: has it learned the data at all? The probe stage and the promotion gate both ask it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from infra.cards import LEARNED
from models.metrics import Draws, excess_ratio
from workers.evaluation.table import CEILING, FLOOR, Row, best_row, finite, lowest_fid, reference_row

# name -> (numerator, denominator, the bar it is held to: ratio <= bar)
BARS = {
    "base best / VAE ceiling": 8.0,  # the teacher: its excess at most 8x the VAE reconstructions'
    "consistency@1 / base best": 1.3,
    "best consistency@2-4 / consistency@1": 1.0,
    "best reflow@2 / base best": 1.2,
    "consistency@1 / base@1": 0.25,
    # The flow-map student (issue 24): better than consistency at one step, better with every step.
    "flowmap@1 / consistency@1": 0.9,
    "flowmap@2 / flowmap@1": 0.9,
    "flowmap@4 / flowmap@2": 1.0,
    "flowmap@4 / base best": 1.1,
}
# name -> the bar a share is held to: share >= bar (the interval's low end, for "met")
ACCURACY_BARS = {"base best class accuracy": 0.7}


@dataclass(frozen=True)
class Ratio:
    """(excess of numerator) / (excess of denominator) over the floor: below 1 the numerator is better."""

    name: str
    numerator: str  # e.g. "consistency (consistency@1, w=1)"
    denominator: str
    value: float | None  # the plug-in ratio (a share: the measured share)
    low: float | None = None
    high: float | None = None
    bar: float | None = None
    note: str = ""
    direction: str = "<="  # "<=": a ratio held under its bar; ">=": a share (class accuracy) held over it
    corrected: float | None = None  # the bias-corrected ratio its interval is built around (None: no draws)

    @property
    def verdict(self) -> str:
        if self.value is None or self.bar is None:
            return "–"
        if self.direction == ">=":
            if self.low is not None and self.low >= self.bar:
                return "met"
            if self.high is not None and self.high < self.bar:
                return "not met"
            return "within interval of the bar"
        if self.high is not None and self.high <= self.bar:
            return "met"
        if self.low is not None and self.low > self.bar:
            return "not met"
        return "met" if self.value <= self.bar and self.high is None else "within interval of the bar"

    def as_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "corrected": self.corrected,
            "low": self.low,
            "high": self.high,
            "bar": self.bar,
            "verdict": self.verdict,
            "numerator": self.numerator,
            "denominator": self.denominator,
            "direction": self.direction,
        }


def wilson(share: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a share measured on ``n`` draws."""
    from statistics import NormalDist

    z = NormalDist().inv_cdf(0.5 + level / 2)
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def accuracy_bar(name: str, row: Row | None, level: float) -> Ratio:
    """A row's class accuracy against its bar, with a Wilson interval over its n samples."""
    bar = ACCURACY_BARS[name]
    share = None if row is None else row.class_accuracy
    if not finite(share) or not row.n:
        return Ratio(name, label(row), "–", None, bar=bar, note="no class accuracy (no classifier)", direction=">=")
    low, high = wilson(share, row.n, level)
    return Ratio(name, label(row), "–", share, low, high, bar, direction=">=")


def label(row: Row | None) -> str:
    """``base (euler@8, w=2)``: a row's :attr:`~workers.evaluation.table.Row.tag`, or – when missing."""
    return "–" if row is None else row.tag


def excess(
    name: str, top: Row | None, bottom: Row | None, rows: Sequence[Row], draws: Mapping[str, Draws] | None, level: float
) -> Ratio:
    bar = BARS.get(name)
    floor = reference_row(rows, FLOOR)
    if top is None or bottom is None or floor is None:
        return Ratio(name, label(top), label(bottom), None, bar=bar, note="a model or the floor was not evaluated")
    denominator = bottom.fid - floor.fid
    if not denominator > 0:
        return Ratio(
            name,
            label(top),
            label(bottom),
            None,
            bar=bar,
            note="the denominator is not above the floor: it cannot be told from real data",
        )
    value = (top.fid - floor.fid) / denominator
    keys = (top.key, bottom.key, floor.key)
    if draws is None or any(k not in draws for k in keys):
        return Ratio(name, label(top), label(bottom), value, bar=bar, note="no paired draws: no interval")
    ratio = excess_ratio(draws[keys[0]], draws[keys[1]], draws[keys[2]], level)
    return Ratio(name, label(top), label(bottom), ratio.value, ratio.low, ratio.high, bar, corrected=ratio.corrected)


def quality_ratios(rows: Sequence[Row], draws: Mapping[str, Draws] | None = None, level: float = 0.95) -> list[Ratio]:
    """The issue's quality bars, found by the stage of each row's model (not its display name).

    "best" and "@k" range over samplers and guidance scales; "base@1" is the base model at one
    network pass (NFE 1: guidance 1, no doubled batch), the cost of the student's one step.

    When an evaluation holds two students of one stage (the run's candidate and the served model it
    must beat), that stage's bars read the candidate's rows only: the first student in the table,
    as the pipeline lists the run's own generators before the served one. The flow-map bars are
    there only when a flow-map student was evaluated."""
    base_best = best_row(rows, stage="base")
    candidate = first_student(rows, "consistency")
    consistency_1 = best_row(candidate, steps=1)
    consistency_multi = lowest_fid([r for r in candidate if r.steps in (2, 3, 4)])
    flowmap = first_student(rows, "flowmap")
    flowmap_at = {k: best_row(flowmap, steps=k) for k in (1, 2, 4)}
    flowmap_bars = [
        excess("flowmap@1 / consistency@1", flowmap_at[1], consistency_1, rows, draws, level),
        excess("flowmap@2 / flowmap@1", flowmap_at[2], flowmap_at[1], rows, draws, level),
        excess("flowmap@4 / flowmap@2", flowmap_at[4], flowmap_at[2], rows, draws, level),
        excess("flowmap@4 / base best", flowmap_at[4], base_best, rows, draws, level),
    ]
    return [
        accuracy_bar("base best class accuracy", base_best, level),
        excess("base best / VAE ceiling", base_best, reference_row(rows, CEILING), rows, draws, level),
        excess("consistency@1 / base best", consistency_1, base_best, rows, draws, level),
        excess("best consistency@2-4 / consistency@1", consistency_multi, consistency_1, rows, draws, level),
        excess("best reflow@2 / base best", best_row(rows, stage="reflow", steps=2), base_best, rows, draws, level),
        excess(
            "consistency@1 / base@1", consistency_1, best_row(rows, stage="base", steps=1, nfe=1), rows, draws, level
        ),
        *(flowmap_bars if flowmap else []),
        *guidance_ratios(rows, base_best, draws, level),
        *lora_ratios(rows, candidate, draws, level),
    ]


def matching(rows: Sequence[Row], steps: int, guidance: float | None, sampler: str) -> Row | None:
    found = [r for r in rows if r.steps == steps and r.guidance == guidance and r.sampler == sampler]
    return found[0] if found else None


def guidance_ratios(
    rows: Sequence[Row], base_best: Row | None, draws: Mapping[str, Draws] | None, level: float
) -> list[Ratio]:
    """The guidance-distilled base (one pass a step) against the base with real classifier-free
    guidance (two), at the base's best setting (k steps, scale w): at equal steps, where the guided
    model spends half the NFE, and at equal NFE, against the base at k / 2 steps. No bar: the NFE
    saved at equal quality."""
    guided = first_student(rows, "guidance_distill")
    if not guided or base_best is None:
        return []
    k, w, sampler = base_best.steps, base_best.guidance, base_best.sampler
    at_k = matching(guided, k, w, sampler)
    ratios = [excess(f"guided@{k} / base@{k} (equal steps, w={w:g})", at_k, base_best, rows, draws, level)]
    if base_best.nfe == 2 * k and k % 2 == 0:  # the base's best is guided: equal NFE is half its steps
        base_half = matching([r for r in rows if r.stage_key == base_best.stage_key], k // 2, w, sampler)
        ratios.append(excess(f"guided@{k} / base@{k // 2} (equal NFE, w={w:g})", at_k, base_half, rows, draws, level))
    return ratios


def lora_ratios(
    rows: Sequence[Row], consistency: Sequence[Row], draws: Mapping[str, Draws] | None, level: float
) -> list[Ratio]:
    """The LoRA student against the full consistency student at each step count both were scored at.
    No bar: an adapter of a few percent of the model's size, and what it costs in quality."""
    lora = first_student(rows, "lora")
    steps = sorted({r.steps for r in lora} & {r.steps for r in consistency})
    return [
        excess(
            f"lora@{k} / consistency@{k}", best_row(lora, steps=k), best_row(consistency, steps=k), rows, draws, level
        )
        for k in steps
    ]


def first_student(rows: Sequence[Row], stage: str) -> list[Row]:
    """The rows of the first model of ``stage`` in the table (the run's own, before a served one)."""
    students = [r for r in rows if r.stage == stage]
    return [r for r in students if r.stage_key == students[0].stage_key] if students else []


# --------------------------------------------------------------------------- has it learned?

# The likely fix when a model of this stage has not learned the data, in the config's own words.
FIXES = {
    "base": "raise base.steps or use a larger base.model",
    "reflow": "check the base model's probe first; then raise reflow.steps or pairs.pairs",
    "consistency": "check its teacher's probe first; then raise consistency.steps",
    "flowmap": "check its teacher's probe first; then raise flowmap.steps",
    "ddpm": "raise ddpm.steps or use a larger ddpm.model",
    "guidance_distill": "check the base model's probe first; then raise guidance_distill.steps",
    "lora": "check the base model's probe first; then raise lora.steps or lora.rank",
}


def fix_for(stage: str) -> str:
    return FIXES.get(stage, f"train it longer ({stage}.steps) or use a larger model")


@dataclass(frozen=True)
class Figures:
    """What the absolute bar reads of one model at one setting, beside the references at the same n."""

    fid: float | None
    floor_fid: float | None  # real train images vs the test split
    ceiling_fid: float | None  # their VAE reconstructions
    class_accuracy: float | None = None  # None: no classifier
    chance: float | None = None  # 1 / num_classes; None: unlabelled
    real_accuracy: float | None = None  # the classifier on the real images (the floor's)

    @classmethod
    def of(cls, row: Row, rows: Sequence[Row], chance: float | None) -> Figures:
        """A row's figures beside the floor and ceiling rows of its table."""
        floor, ceiling = reference_row(rows, FLOOR), reference_row(rows, CEILING)
        return cls(
            fid=row.fid,
            floor_fid=None if floor is None else floor.fid,
            ceiling_fid=None if ceiling is None else ceiling.fid,
            class_accuracy=row.class_accuracy,
            chance=chance,
            real_accuracy=None if floor is None else floor.class_accuracy,
        )


def shortfalls(
    figures: Figures, min_accuracy_over_chance: float, max_excess_over_ceiling: float | None, at: str = ""
) -> list[str]:
    """Where ``figures`` miss the absolute bar, each in plain words with its numbers (empty: none).

    class accuracy < ``min_accuracy_over_chance`` x chance                  (0: no accuracy bar)
    FID - floor    > ``max_excess_over_ceiling`` x (ceiling FID - floor)    (None: no FID bar)

    A figure that was not measured (no classifier, unlabelled data, a ceiling not above the
    floor) is not held against the model."""
    where = f" {at}" if at else ""
    out = []
    f = figures
    if min_accuracy_over_chance > 0 and finite(f.class_accuracy) and f.chance:
        bar = min_accuracy_over_chance * f.chance
        if f.class_accuracy < bar:
            real = f", real images {f.real_accuracy:.2f}" if finite(f.real_accuracy) else ""
            out.append(
                f"class accuracy {f.class_accuracy:.2f}{where} (chance {f.chance:.2f}{real}; "
                f"the bar is {min_accuracy_over_chance:g}x chance = {bar:.2f})"
            )
    if max_excess_over_ceiling is not None and all(finite(v) for v in (f.fid, f.floor_fid, f.ceiling_fid)):
        ceiling_excess, excess = f.ceiling_fid - f.floor_fid, f.fid - f.floor_fid
        if ceiling_excess > 0 and excess > max_excess_over_ceiling * ceiling_excess:
            out.append(
                f"FID {f.fid:.4g}{where} is {excess:.4g} above the floor {f.floor_fid:.4g}, "
                f"{excess / ceiling_excess:.3g}x the VAE ceiling's excess {ceiling_excess:.3g} "
                f"(the bar is {max_excess_over_ceiling:g}x)"
            )
    return out


def learned_verdict(
    ref: str,
    figures: Figures,
    min_accuracy_over_chance: float,
    max_excess_over_ceiling: float | None,
    at: str = "",
) -> str:
    """:data:`infra.cards.LEARNED`, or a one-line warning naming the model, its figures and the fix."""
    problems = shortfalls(figures, min_accuracy_over_chance, max_excess_over_ceiling, at)
    if not problems:
        return LEARNED
    stage, _, key = ref.partition("/")
    name = f"{stage}/{key[:4]}…" if len(key) > 4 else ref
    return f"{name}: {'; '.join(problems)}: this model has not learned the data; {fix_for(stage)}"
