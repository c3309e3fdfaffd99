"""What the evaluation writes, on typed rows: the card and report carry the reference rows' class
accuracy; each FID is shown inside its own interval; published numbers appear only in the table
marked "reference, not measured here", each with its source; grids embed each model's best row."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from infra.cards import EvaluationCard
from infra.config import EvaluateConfig
from workers.evaluation.grids import grid_file, make_grid
from workers.evaluation.measure import with_intervals
from workers.evaluation.outputs import Evaluation, headline
from workers.evaluation.report import (
    NOT_MEASURED,
    fid_cell,
    reference_numbers,
    render_report,
    sample_grids,
    systems_section,
)
from workers.evaluation.table import CEILING, FLOOR, REFERENCE, Row

INFO = dict(
    extractor="features-ref", n=100, seed=0, knn_k=3, n_test=80, images_ref="images-ref", vae_ref="vae-ref", models={}
)


def row(model: str, sampler: str, steps: int, fid: float, accuracy: float | None) -> Row:
    guidance = None if steps == 0 else 1.0
    return Row(
        model, f"{model}-key", sampler, steps, steps, guidance, 100, "features-ref", fid, class_accuracy=accuracy
    )


def evaluation(floor: float | None, ceiling: float | None) -> Evaluation:
    rows = [
        row(FLOOR, REFERENCE, 0, 7.4, floor),
        row(CEILING, REFERENCE, 0, 14.5, ceiling),
        row("base", "euler", 4, 364.0, None if floor is None else 0.15),
    ]
    return Evaluation(rows=rows, grids={}, straightness={}, info=INFO)


def test_the_card_and_the_report_carry_the_ceilings_class_accuracy_beside_the_floors():
    e = evaluation(0.987, 0.93)
    card = headline(e)
    assert (card.floor_class_accuracy, card.vae_class_accuracy) == (0.987, 0.93)
    assert EvaluationCard.from_metrics(card.__dict__, "evaluate-ref") == card  # a round trip through a manifest
    report = render_report(e, "store/evaluate")
    line = next(line for line in report.splitlines() if line.startswith("Class accuracy of real train images"))
    assert "0.987" in line and "VAE reconstructions 0.93" in line
    assert f"| {CEILING} | {REFERENCE} |" in report  # and its row in the table, with the column


def test_without_a_classifier_there_is_no_class_accuracy_to_report():
    e = evaluation(None, None)
    card = headline(e)
    assert card.floor_class_accuracy is None and card.vae_class_accuracy is None
    assert "Class accuracy of real train images" not in render_report(e, "store/evaluate")


def test_an_old_card_without_the_fields_still_loads():
    metrics = {k: v for k, v in headline(evaluation(0.9, 0.8)).__dict__.items() if "class_accuracy" not in k}
    card = EvaluationCard.from_metrics(metrics, "evaluate-ref")
    assert card.floor_class_accuracy is None and card.vae_class_accuracy is None


# --------------------------------------------------------------------------- values inside their intervals


def cell_numbers(cell: str) -> tuple[float, float, float]:
    """``v [low, high]`` -> (v, low, high)."""
    value, low, high = re.fullmatch(r"\s*(\S+) \[(\S+), (\S+)\]\s*", cell).groups()
    return float(value), float(low), float(high)


def test_the_report_shows_each_fid_inside_its_own_interval_with_the_plug_in_value_labelled():
    """Equal laws at n = 300 in 32 dimensions: the floor's plug-in FID lies above its basic
    interval (as the old report's "FID 7.43 [-9.86, 1.95]" did); the report shows the corrected
    value inside it, and the plug-in value in its own column."""
    g = torch.Generator().manual_seed(23)
    test, train, model = (torch.randn(300, 32, generator=g, dtype=torch.float64).numpy() for _ in range(3))
    model = model * 1.5 + 0.3  # a model off the data: far above the floor
    rows = [
        Row(FLOOR, "ingest/k", REFERENCE, 0, 0, None, 300, "f"),
        Row("base", "base/k", "euler", 4, 4, 1.0, 300, "f"),
    ]
    config = EvaluateConfig(fid_resamples=60, kid_subsets=10, kid_subset_size=100)
    rows, _ = with_intervals(config, test, rows, {rows[0].key: train, rows[1].key: model})
    floor = rows[0]
    assert not floor.fid_low <= floor.fid <= floor.fid_high  # the case the old report got wrong
    report = render_report(Evaluation(rows, {}, {}, {**INFO, "interval_level": 0.95, "fid_resamples": 60}), "here")
    header = next(line for line in report.splitlines() if line.startswith("| model | sampler"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[5:7] == ["FID* [interval]", "plug-in FID"]
    for r in rows:
        line = next(line for line in report.splitlines() if line.startswith(f"| {r.model} | {r.sampler} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        value, low, high = cell_numbers(cells[5])
        assert low <= value <= high, line
        assert value == pytest.approx(r.fid_corrected, rel=1e-3) and float(cells[6]) == pytest.approx(r.fid, rel=1e-3)
    assert "bias-corrected FID* = 2 FID − median of the draws" in report  # the report says which it shows
    assert fid_cell(floor).startswith(f"{floor.fid_corrected:.4g} [")


# --------------------------------------------------------------------------- published numbers


def test_published_numbers_appear_only_in_the_table_marked_not_measured_here_each_with_its_source():
    numbers = reference_numbers()
    assert {(e.stage, e.steps, e.fid) for e in numbers} == {
        ("ddpm", 1000, 7.9),
        ("base", 50, 7.5),
        ("reflow", 2, 8.0),
        ("consistency", 1, 9.5),
    }
    assert all(e.source.strip() and e.data.strip() for e in numbers)
    report = render_report(evaluation(0.9, 0.8), "store/evaluate")
    sections = report.split("\n## ")
    marked = [s for s in sections if s.startswith("Published numbers") and NOT_MEASURED in s.splitlines()[0]]
    assert len(marked) == 1
    table = [line for line in marked[0].splitlines() if line.startswith("| ")]
    assert f"FID ({NOT_MEASURED})" in table[0]
    for e in numbers:
        line = next(line for line in table[1:] if line.startswith(f"| {e.system} |"))
        assert f"| {e.fid:g} |" in line and e.source in line
    # Nowhere else: no other section quotes a published FID or the notes they come from.
    for section in sections:
        if section is not marked[0]:
            assert not any(re.search(rf"(?<![\d.]){e.fid:.1f}(?![\d])", section) for e in numbers), section[:80]
            assert "notes" not in section.lower(), section[:80]


def test_the_run_is_lined_up_with_the_published_systems_from_its_own_rows():
    def at(model, sampler, steps, fid):
        stage = model.split("-")[0]
        return Row(model, f"{stage}/k{model}", sampler, steps, steps, fid=fid, fid_low=fid - 1.0, fid_high=fid + 1.0)

    rows = [
        at(FLOOR, REFERENCE, 0, 1.0),
        at("base", "euler", 32, 12.0),
        at("base", "heun", 32, 11.0),
        at("base", "euler", 64, 13.0),
        at("ddpm", "ddpm", 1000, 9.0),
        at("ddpm", "ddim", 1000, 8.0),
        at("ddpm", "ddim", 10, 30.0),
        at("reflow-1", "euler", 2, 25.0),
        at("reflow-2", "euler", 2, 20.0),
        at("consistency", "consistency", 1, 15.0),
    ]
    numbers = reference_numbers()
    table = [line for line in systems_section(rows, numbers) if line.startswith("| ")]
    assert table[0].split(" | ")[-1] == "note |" and NOT_MEASURED not in "\n".join(table)
    ddpm, fm, reflow, cm = (line.split(" | ") for line in table[1:])
    assert ddpm[1:7] == ["1000", "ddpm", "ddim", "1000", "1000", "8 [7, 9]"] and ddpm[-1] == " |"
    # 50 not evaluated: 64 is the nearest; its best sampler there, and the row says so.
    assert fm[1:6] == ["50", "base", "euler", "64", "64"] and "nearest evaluated step count 64" in fm[-1]
    assert reflow[2:7] == ["reflow-2", "euler", "2", "2", "20 [19, 21]"]  # the best round, with its interval
    assert cm[2:8] == ["consistency", "consistency", "1", "1", "15 [14, 16]", "15"]
    # A system the run did not train is said to be missing, not dropped.
    missing = [line for line in systems_section(rows[:4], numbers) if line.startswith("| DDPM")]
    assert "not in this run (no `ddpm` stage rows with a finite FID)" in missing[0]


# --------------------------------------------------------------------------- grids


def test_the_report_embeds_each_models_best_grid_and_links_the_rest():
    def at(model, steps, guidance, fid):
        return Row(model, f"{model}/k", "euler", steps, steps, guidance, fid=fid)

    rows = [at("base", 4, 1.0, 90.0), at("base", 4, 2.0, 60.0), at("reflow-1", 2, 1.0, 80.0)]
    grids = {grid_file(r.model, r.sampler, r.steps, r.guidance): b"" for r in rows}
    grids["grids/real-test.png"] = grids["grids/vae-recon.png"] = b""
    text = "\n".join(sample_grids(grids, rows))
    embedded = [line for line in text.splitlines() if line.startswith("![")]
    assert embedded == [
        "![real test images](grids/real-test.png)",
        "![VAE reconstructions (the ceiling)](grids/vae-recon.png)",
        "![base, its best row: euler 4 steps at guidance 2, FID 60](grids/base-euler-4-g2.png)",
        "![reflow-1, its best row: euler 2 steps at guidance 1, FID 80](grids/reflow-1-euler-2-g1.png)",
    ]
    assert "- [base-euler-4-g1](grids/base-euler-4-g1.png)" in text  # the rest are links


def test_grid_puts_one_class_per_column():
    pixels = np.zeros((20, 8, 8, 1), np.uint8)
    labels = np.arange(20) % 5
    pixels[labels == 3] = 255  # class 3 white
    grid = np.asarray(Image.open(io.BytesIO(make_grid(pixels, labels, num_classes=5))))
    scale = grid.shape[1] // (5 * 10 + 2)
    cell = 10 * scale  # 8 px + 2 px padding, upscaled
    column_means = [grid[:, j * cell + 2 * scale : j * cell + 10 * scale].mean() for j in range(5)]
    assert column_means[3] > 200 and max(column_means[:3] + column_means[4:]) < 60
