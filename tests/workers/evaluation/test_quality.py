"""The quality bars on typed rows: ratios on excess over the floor, with intervals from paired draws;
the teacher's bars; the candidate student read apart from the served one."""

from __future__ import annotations

import pytest
import torch

from models.metrics import Draws
from workers.evaluation.quality import quality_ratios
from workers.evaluation.table import CEILING, FLOOR, REFERENCE, Row, best_by_steps


def row(model, sampler, steps, fid, nfe=None, **extra) -> Row:
    stage = model.split("-")[0]
    stage_key = extra.pop("stage_key", f"{stage}/k{model}")
    return Row(model, stage_key, sampler, steps, nfe or steps, fid=fid, **extra)


def test_best_per_step_count_and_quality_ratios_on_excess_over_the_floor():
    rows = [
        row(FLOOR, REFERENCE, 0, 2.0),
        row("base", "euler", 1, 82.0),
        row("base", "heun", 1, 62.0, nfe=2),
        row("base", "euler", 8, 12.0),
        row("reflow-1", "euler", 2, 32.0),
        row("reflow-2", "euler", 2, 22.0),
        row("consistency", "consistency", 1, 17.0),
        row("consistency", "consistency", 2, 14.0),
    ]
    best = best_by_steps(rows)
    assert [(s, r.model, r.sampler) for s, r in best.items()] == [
        (1, "consistency", "consistency"),
        (2, "consistency", "consistency"),
        (8, "base", "euler"),
    ]
    ratios = {r.name: r for r in quality_ratios(rows)}
    assert ratios["consistency@1 / base best"].value == pytest.approx((17 - 2) / (12 - 2))
    assert ratios["consistency@1 / base@1"].value == pytest.approx((17 - 2) / (82 - 2))  # Euler: 1 NFE, not Heun's 2
    assert ratios["best reflow@2 / base best"].value == pytest.approx((22 - 2) / (12 - 2))  # the best round
    assert ratios["best consistency@2-4 / consistency@1"].value == pytest.approx((14 - 2) / (17 - 2))
    distillation = [name for name in ratios if "ceiling" not in name and "class accuracy" not in name]
    assert all(ratios[name].low is None and "no paired draws" in ratios[name].note for name in distillation)
    assert all(ratios[name].corrected is None for name in distillation)  # no draws: nothing to correct

    # With paired draws, every ratio gets an interval from them, and the corrected ratio inside it.
    generator = torch.Generator().manual_seed(0)
    draws = {r.key: Draws(r.fid, r.fid + torch.randn(50, generator=generator, dtype=torch.float64)) for r in rows}
    paired = {r.name: r for r in quality_ratios(rows, draws)}
    bar = paired["consistency@1 / base best"]
    assert (
        bar.low < bar.value < bar.high and bar.bar == 1.3 and bar.verdict in ("not met", "within interval of the bar")
    )
    assert all(r.low <= r.corrected <= r.high for name, r in paired.items() if name in distillation)
    assert paired["consistency@1 / base@1"].verdict == "met"  # (17-2)/(82-2) = 0.19, well under 0.25
    # A denominator at the floor has no ratio (it cannot be told from real data).
    at_floor = [Row(**{**r.to_record(), "fid": 2.0}) if (r.model, r.steps) == ("base", 8) else r for r in rows]
    undefined = {r.name: r for r in quality_ratios(at_floor)}["consistency@1 / base best"]
    assert undefined.value is None and "not above the floor" in undefined.note and undefined.verdict == "–"


def test_the_teacher_bars_read_the_base_models_best_row_against_the_ceiling_and_its_class_accuracy():
    """Issue 20's bars: base best class accuracy >= 0.7 (Wilson interval) and excess <= 8x the VAE ceiling's."""

    def scored(model, stage_key, sampler, steps, fid, accuracy, guidance=1.0, n=2000):
        return Row(model, stage_key, sampler, steps, steps, guidance, n, fid=fid, class_accuracy=accuracy)

    floor = scored(FLOOR, "ingest/k", REFERENCE, 0, 7.0, 0.99, guidance=None)
    ceiling = scored(CEILING, "vae/k", REFERENCE, 0, 14.0, 0.93, guidance=None)
    learned = scored("base", "base/k", "euler", 16, 40.0, 0.80, guidance=2.0)
    ratios = {
        r.name: r for r in quality_ratios([floor, ceiling, learned, scored("base", "base/k", "euler", 1, 90.0, 0.2)])
    }
    accuracy = ratios["base best class accuracy"]
    assert accuracy.value == 0.80 and accuracy.low < 0.80 < accuracy.high and accuracy.verdict == "met"
    assert "w=2" in accuracy.numerator  # read at the best row's own guidance
    excess = ratios["base best / VAE ceiling"]
    assert excess.value == pytest.approx((40 - 7) / (14 - 7)) and excess.verdict == "met"  # 4.7 <= 8

    blobs = scored("base", "base/k", "euler", 16, 364.0, 0.15)
    ratios = {r.name: r for r in quality_ratios([floor, ceiling, blobs])}
    assert ratios["base best class accuracy"].verdict == "not met"
    assert ratios["base best / VAE ceiling"].value == pytest.approx((364 - 7) / 7)
    # At 0.7 on 100 samples the interval straddles the bar: not a result either way.
    close = scored("base", "base/k", "euler", 16, 40.0, 0.70, n=100)
    assert {r.name: r for r in quality_ratios([floor, ceiling, close])}["base best class accuracy"].verdict == (
        "within interval of the bar"
    )


def test_consistency_bars_read_the_candidate_not_the_served_student_beside_it():
    """The pipeline scores the served student after the run's own: the bars must not mix the two."""
    rows = [
        row(FLOOR, REFERENCE, 0, 2.0, stage_key="ingest/k"),
        row("base", "euler", 8, 12.0, stage_key="base/k"),
        row("consistency-aaaa", "consistency", 1, 17.0, stage_key="consistency/aaaa"),  # the candidate
        row("consistency-aaaa", "consistency", 4, 15.0, stage_key="consistency/aaaa"),
        row("consistency-bbbb", "consistency", 1, 30.0, stage_key="consistency/bbbb"),  # the served one, better at 4
        row("consistency-bbbb", "consistency", 4, 5.0, stage_key="consistency/bbbb"),
    ]
    ratios = {r.name: r for r in quality_ratios(rows)}
    assert ratios["consistency@1 / base best"].value == pytest.approx((17 - 2) / (12 - 2))
    assert ratios["best consistency@2-4 / consistency@1"].value == pytest.approx((15 - 2) / (17 - 2))
    assert "consistency-aaaa" in ratios["best consistency@2-4 / consistency@1"].numerator


def test_the_flowmap_bars_read_the_first_flowmap_student_and_appear_only_with_one():
    rows = [
        row(FLOOR, REFERENCE, 0, 2.0),
        row("base", "euler", 8, 12.0),
        row("consistency", "consistency", 1, 22.0),
        row("flowmap", "flowmap", 1, 17.0),
        row("flowmap", "flowmap", 2, 12.0),
        row("flowmap", "flowmap", 4, 10.0),
        # a served flow-map student scored beside the run's: never read by the bars
        row("flowmap-old", "flowmap", 1, 3.0, stage_key="flowmap/old"),
        row("flowmap-old", "flowmap", 4, 3.0, stage_key="flowmap/old"),
    ]
    ratios = {r.name: r for r in quality_ratios(rows)}
    assert ratios["flowmap@1 / consistency@1"].value == pytest.approx((17 - 2) / (22 - 2))
    assert ratios["flowmap@2 / flowmap@1"].value == pytest.approx((12 - 2) / (17 - 2))
    assert ratios["flowmap@4 / flowmap@2"].value == pytest.approx((10 - 2) / (12 - 2))
    assert ratios["flowmap@4 / base best"].value == pytest.approx((10 - 2) / (12 - 2))
    assert ratios["flowmap@1 / consistency@1"].verdict == "met"  # 0.75 <= 0.9, no interval
    without = {r.name for r in quality_ratios([r for r in rows if r.stage != "flowmap"])}
    assert not any(name.startswith("flowmap") for name in without)


def test_the_guided_base_is_read_against_the_base_at_equal_steps_and_equal_nfe_and_lora_against_the_full_student():
    rows = [
        row(FLOOR, REFERENCE, 0, 2.0),
        row("base", "euler", 8, 12.0, nfe=16, guidance=2.0),  # the base's best: 8 guided steps, 16 passes
        row("base", "euler", 4, 16.0, nfe=8, guidance=2.0),
        row("base", "euler", 8, 20.0, nfe=8, guidance=1.0),
        row("guidance_distill", "euler", 8, 11.0, nfe=8, guidance=2.0, stage_key="guidance_distill/g"),
        row("guidance_distill", "euler", 8, 30.0, nfe=8, guidance=1.0, stage_key="guidance_distill/g"),
        row("consistency", "consistency", 1, 22.0),
        row("consistency", "consistency", 2, 17.0),
        row("lora", "consistency", 1, 26.0, stage_key="lora/l"),
        row("lora", "consistency", 2, 12.0, stage_key="lora/l"),
    ]
    ratios = {r.name: r for r in quality_ratios(rows)}
    equal_steps, equal_nfe = (
        ratios["guided@8 / base@8 (equal steps, w=2)"],
        ratios["guided@8 / base@4 (equal NFE, w=2)"],
    )
    assert equal_steps.value == pytest.approx((11 - 2) / (12 - 2)) and equal_steps.bar is None
    assert equal_nfe.value == pytest.approx((11 - 2) / (16 - 2))
    assert ratios["lora@1 / consistency@1"].value == pytest.approx((26 - 2) / (22 - 2))
    assert ratios["lora@2 / consistency@2"].value == pytest.approx((12 - 2) / (17 - 2))
    assert ratios["lora@1 / consistency@1"].verdict == "–"  # no bar: a measurement, not a test
    without = {r.name for r in quality_ratios([r for r in rows if r.stage not in ("guidance_distill", "lora")])}
    assert not any(name.startswith(("guided", "lora")) for name in without)
