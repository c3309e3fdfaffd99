"""The evaluation's reference rows in its card and report: the class accuracy of real images
(the floor) beside that of their VAE reconstructions (the ceiling)."""

from __future__ import annotations

from typing import Any

from infra.cards import EvaluationCard
from infra.metrics_table import CEILING, COLUMNS, FLOOR, REFERENCE
from workers.report import Evaluation, headline, render_report

INFO = dict(
    extractor="features-ref", n=100, seed=0, knn_k=3, n_test=80, images_ref="images-ref", vae_ref="vae-ref", models={}
)


def row(model: str, sampler: str, steps: int, fid: float, accuracy: float | None) -> dict[str, Any]:
    values = dict(model=model, stage_key=f"{model}-key", sampler=sampler, steps=steps, nfe=steps, n=100)
    values |= dict(extractor="features-ref", fid=fid, class_accuracy=accuracy, guidance=None if steps == 0 else 1.0)
    return {c: values.get(c) for c in COLUMNS}


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


def test_the_report_embeds_each_models_best_grid_and_links_the_rest():
    from workers.report import grid_file, sample_grids

    def row(model, steps, guidance, fid):
        return {
            "model": model,
            "sampler": "euler",
            "steps": steps,
            "guidance": guidance,
            "fid": fid,
            "nfe": steps,
            "stage_key": f"{model}/k",
        }

    rows = [row("base", 4, 1.0, 90.0), row("base", 4, 2.0, 60.0), row("reflow-1", 2, 1.0, 80.0)]
    grids = {grid_file(r["model"], r["sampler"], r["steps"], r["guidance"]): b"" for r in rows}
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
