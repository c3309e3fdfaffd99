"""The features and evaluate stages on a tiny stored run: real digits, random-weight generators."""

from __future__ import annotations

import io
import math
import os
import sys

import pandas as pd
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from evaluate_fixtures import DIFFUSION_T, commit, commit_diffusion, commit_tiny_run  # noqa: E402

from infra.cards import EvaluationCard, FeaturesCard, GeneratorCard, ImagesCard  # noqa: E402
from infra.config import ConfigError, EvaluateConfig, FeaturesConfig, Resources  # noqa: E402
from infra.store import Store  # noqa: E402
from models.classifier import Classifier  # noqa: E402
from workers.evaluation.table import (  # noqa: E402
    CEILING,
    COLUMNS,
    FLOOR,
    REFERENCE,
    best_guidance,
    fid_at,
    read_draws,
    read_rows,
)
from workers.evaluation.tasks import compute_evaluation  # noqa: E402
from workers.stages.s09_features import run_features  # noqa: E402
from workers.stages.s10_evaluate import run_evaluate  # noqa: E402

pytestmark = pytest.mark.timeout(600)

CONFIG = EvaluateConfig(
    n=64,
    flow_steps=(1, 2),
    flow_solvers=("euler", "heun"),
    consistency_steps=(1, 2),
    guidance=(1.0,),  # one scale here; test_guided_models_get_a_row_per_scale_the_student_one takes several
    resources=Resources(workers=2),
)
CLASSIFIER = FeaturesConfig(steps=60, batch_size=32)
CELLS = [
    ("base", "euler", 1, 1),
    ("base", "euler", 2, 2),
    ("base", "heun", 1, 2),
    ("base", "heun", 2, 4),
    ("reflow-1", "euler", 1, 1),
    ("reflow-1", "euler", 2, 2),
    ("reflow-1", "heun", 1, 2),
    ("reflow-1", "heun", 2, 4),
    ("consistency", "consistency", 1, 1),
    ("consistency", "consistency", 2, 2),
]  # model, sampler, steps, NFE


@pytest.fixture(scope="module")
def evaluated(ray_local, tmp_path_factory):
    store = Store.open(str(tmp_path_factory.mktemp("evaluate") / "store"))
    run = commit_tiny_run(store)
    classifier = run_features(store, CLASSIFIER, run.images)
    manifest = run_evaluate(store, CONFIG, run.generators, run.images, run.vae, classifier)
    return store, run, classifier, manifest


def by_cell(rows):
    return {(r.model, r.sampler, r.steps): r for r in rows}


def test_classifier_stage_reports_test_accuracy_and_is_reused(evaluated):
    store, run, classifier, _ = evaluated
    card, images = FeaturesCard.from_manifest(classifier), ImagesCard.from_manifest(run.images)
    assert card.n_test == images.n_test and card.n_train == images.n_train
    # Digits are easy: far above chance (0.1) after 60 steps, and a real share.
    assert 0.5 < card.test_accuracy <= 1.0
    assert card.kind == "classifier" and isinstance(store.load_model(classifier, "features"), Classifier)
    # Its key is its own section's (not where it runs), so evaluation settings never retrain it.
    moved = CLASSIFIER.model_copy(update={"resources": Resources(workers=1, cpus=2)})
    assert run_features(store, moved, run.images).ref == classifier.ref


def test_every_output_is_committed_and_loads(evaluated):
    store, run, classifier, manifest = evaluated
    names = set(manifest.files)
    assert {
        "metrics",
        "fid_vs_nfe.png",
        "report.md",
        "straightness",
        "grids/real-test.png",
        "grids/vae-recon.png",
    } <= names
    for model, sampler, steps, _ in CELLS:
        grid = Image.open(io.BytesIO(store.read_bytes(manifest, f"grids/{model}-{sampler}-{steps}-g1.png")))
        assert grid.width > 16 * 2 and grid.height > 16 * 2
    plot = Image.open(io.BytesIO(store.read_bytes(manifest, "fid_vs_nfe.png")))
    assert plot.format == "PNG" and plot.width >= 400

    # The table: exactly the columns, readable without fewstep.
    frame = pd.read_parquet(store.file_path(manifest, "metrics"))
    assert tuple(frame.columns) == COLUMNS
    rows = read_rows(store, manifest)
    card = EvaluationCard.from_manifest(manifest)
    assert len(rows) == 2 + len(CELLS) == card.rows
    assert (rows[0].model, rows[1].model) == (FLOOR, CEILING)
    assert rows[0].stage_key == run.images.ref and rows[1].stage_key == run.vae.ref
    assert all(r.sampler == REFERENCE and r.nfe == 0 for r in rows[:2])
    cells = by_cell(rows[2:])
    assert set(cells) == {(m, s, k) for m, s, k, _ in CELLS}
    refs = {"base": run.base.ref, "reflow-1": run.reflow.ref, "consistency": run.consistency.ref}
    for model, sampler, steps, nfe in CELLS:
        row = cells[(model, sampler, steps)]
        assert row.nfe == nfe and row.n == CONFIG.n and row.stage_key == refs[model]
        assert row.extractor == classifier.ref and row.guidance == 1.0
        assert 0.0 <= row.class_accuracy <= 1.0 and 0.0 <= row.precision <= 1.0 and 0.0 <= row.recall <= 1.0
        assert row.seconds_per_image > 0
        # Random generators decode noise: much further from the test set than real train images are.
        assert math.isfinite(row.fid) and row.fid > rows[0].fid
    assert 0.0 <= rows[0].class_accuracy <= 1.0 and rows[0].fid > 0
    # the ceiling (VAE reconstructions of the same train images) is read by the classifier too
    assert 0.0 <= rows[1].class_accuracy <= 1.0
    assert (card.floor_class_accuracy, card.vae_class_accuracy) == (
        rows[0].class_accuracy,
        rows[1].class_accuracy,
    )
    # Every FID and KID carries an interval; the paired FID draws are stored, one list per row.
    draws = read_draws(store, manifest)
    assert set(draws) == {r.key for r in rows}
    assert len({len(d) for d in draws.values()}) == 1 and len(next(iter(draws.values()))) == CONFIG.fid_resamples
    for r in rows:
        assert r.fid_low < r.fid_high and r.kid_low < r.kid_high, r
        assert r.fid_low <= r.fid_corrected <= r.fid_high, r  # the value the report shows: inside its interval
        assert math.isfinite(r.kid)
    # The models really differ (random weights, not AdaLN-Zero's zero velocity for all).
    assert len({round(r.fid, 6) for r in rows[2:]}) > 3

    # Straightness: for the ODE models only, on their largest step count.
    straightness = store.read_json(manifest, "straightness")
    assert set(straightness) == {"base", "reflow-1"}
    assert all(s["steps"] == 2 and s["value"] >= 0 and math.isfinite(s["value"]) for s in straightness.values())

    report = store.read_bytes(manifest, "report.md").decode()
    assert "fid_vs_nfe.png" in report and classifier.ref in report
    assert all(f"grids/{m}-{s}-{k}-g1.png" in report for m, s, k, _ in CELLS)
    assert (
        "consistency@1 / base best" in report
        and "reflow-1 (euler@2, w=1)" in report
        and "excess FID over the floor" in report
    )
    ratio = card.ratios["consistency@1 / base best"]
    assert ratio["value"] is not None and ratio["low"] < ratio["high"] and ratio["bar"] == 1.3
    assert ratio["low"] <= ratio["corrected"] <= ratio["high"]
    assert card.floor_fid == pytest.approx(rows[0].fid)
    assert card.features_test_accuracy == FeaturesCard.from_manifest(classifier).test_accuracy


def test_fid_at_reads_the_table(evaluated):
    store, run, _, manifest = evaluated
    rows = read_rows(store, manifest)
    cells = by_cell(rows)
    best_at_1 = min(cells[("base", "euler", 1)].fid, cells[("base", "heun", 1)].fid)
    assert fid_at(rows, run.base.ref, 1) == best_at_1
    assert fid_at(rows, run.base.ref, 1, sampler="heun") == cells[("base", "heun", 1)].fid
    assert fid_at(rows, run.consistency.ref, 2) == cells[("consistency", "consistency", 2)].fid
    assert fid_at(rows, run.consistency.ref, 4) is None
    assert fid_at(rows, "base/0000000000000000", 1) is None


def test_same_config_same_manifest_and_fresh_runs_repeat_the_numbers(evaluated):
    store, run, classifier, manifest = evaluated
    # Content addressing; where it runs (its Resources) is not part of the key.
    one_task = CONFIG.model_copy(update={"resources": Resources(workers=1)})
    again = run_evaluate(store, one_task, run.generators, run.images, run.vae, classifier)
    assert again.ref == manifest.ref and again.digest == manifest.digest
    # A fresh computation, one task at a time instead of two: the same numbers.
    rows = by_cell(read_rows(store, manifest))
    fresh = compute_evaluation(store, one_task, run.generators, run.images, run.vae, classifier)
    for row in fresh.rows:
        old = rows[(row.model, row.sampler, row.steps)]
        for column in ("fid", "precision", "recall", "class_accuracy"):
            assert getattr(row, column) == pytest.approx(getattr(old, column), rel=1e-6, abs=1e-6), (row.model, column)
    # ... and the seed matters: another seed draws other images.
    reseeded = compute_evaluation(
        store,
        CONFIG.model_copy(update={"seed": 7, "flow_solvers": ("euler",)}),
        [run.base],
        run.images,
        run.vae,
        classifier,
    )
    assert by_cell(reseeded.rows)[("base", "euler", 1)].fid != pytest.approx(rows[("base", "euler", 1)].fid)


def test_guided_models_get_a_row_per_scale_the_student_one(evaluated):
    """A flow model (takes CFG, labelled digits) is scored at every scale; the student, which takes
    no guidance, once at its card's scale; "best" and the lookups range over the scales."""
    store, run, classifier, _ = evaluated
    config = CONFIG.model_copy(
        update={"flow_steps": (1, 2), "flow_solvers": ("euler",), "consistency_steps": (1,), "guidance": (1.0, 3.0)}
    )
    manifest = run_evaluate(store, config, [run.base, run.consistency], run.images, run.vae, classifier)
    rows = read_rows(store, manifest)
    generated = rows[2:]
    assert sorted((r.model, r.steps, r.guidance, r.nfe) for r in generated) == [
        ("base", 1, 1.0, 1),
        ("base", 1, 3.0, 2),  # guided: the conditional and the null pass both count
        ("base", 2, 1.0, 2),
        ("base", 2, 3.0, 4),
        ("consistency", 1, 1.0, 1),  # its card's scale, one row
    ]
    # Every scale is its own sample set: its own FID, grid and draws.
    base = {(r.steps, r.guidance): r for r in generated if r.model == "base"}
    assert base[(2, 1.0)].fid != pytest.approx(base[(2, 3.0)].fid)
    assert {"grids/base-euler-2-g1.png", "grids/base-euler-2-g3.png", "grids/consistency-consistency-1-g1.png"} <= set(
        manifest.files
    )
    assert set(read_draws(store, manifest)) == {r.key for r in rows} and len(rows) == 7
    # "Best": the lowest FID over steps and scales, said with its scale in the card and the report.
    best = min(base.values(), key=lambda r: r.fid)
    card = EvaluationCard.from_manifest(manifest)
    assert (card.best_by_model["base"]["steps"], card.best_by_model["base"]["guidance"]) == (
        best.steps,
        best.guidance,
    )
    assert best_guidance(rows, run.base.ref) == best.guidance
    at_2 = min((base[(2, 1.0)], base[(2, 3.0)]), key=lambda r: r.fid)
    assert fid_at(rows, run.base.ref, 2) == at_2.fid
    assert fid_at(rows, run.base.ref, 2, guidance=3.0) == base[(2, 3.0)].fid
    report = store.read_bytes(manifest, "report.md").decode()
    assert f"- base best: euler {best.steps} step" in report and f"at guidance {best.guidance:g}" in report
    # The straightness is measured once, at the first scale.
    assert store.read_json(manifest, "straightness")["base"]["guidance"] == 1.0


def test_user_torchscript_extractor(evaluated, tmp_path):
    store, run, classifier, manifest = evaluated

    class Pool(torch.nn.Module):  # a feature map anyone could save: 4x4 average pooling -> 16 features
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)

    path = tmp_path / "features.pt"
    torch.jit.save(torch.jit.script(Pool()), str(path))
    config = CONFIG.model_copy(
        update={"extractor": str(path), "flow_steps": (1,), "flow_solvers": ("euler",), "consistency_steps": (1,)}
    )
    evaluated_with = run_evaluate(store, config, [run.base, run.consistency], run.images, run.vae, classifier)
    rows = read_rows(store, evaluated_with)
    assert len(rows) == 4 and {r.extractor for r in rows} == {rows[0].extractor}
    assert rows[0].extractor.startswith("torchscript:features.pt@")
    assert all(math.isfinite(r.fid) for r in rows)
    # Class accuracy still comes from the classifier, whatever the feature space.
    assert all(0.0 <= r.class_accuracy <= 1.0 for r in rows)

    with pytest.raises(ConfigError, match="not a local file"):
        run_evaluate(
            store,
            config.model_copy(update={"extractor": str(tmp_path / "missing.pt")}),
            [run.base],
            run.images,
            run.vae,
            classifier,
        )


def test_refuses_what_it_cannot_evaluate(evaluated):
    store, run, classifier, _ = evaluated
    with pytest.raises(ValueError, match="not generator models"):
        run_evaluate(store, CONFIG, [run.base, run.vae], run.images, run.vae, classifier)
    other_vae = commit(
        store, "vae", {"seed": 99}, [run.images], {"vae": store.load_model(run.vae, "vae")}, dict(run.vae.metrics)
    )
    card = GeneratorCard.from_manifest(run.base)
    stray = commit(
        store,
        "base",
        {"seed": 99},
        [other_vae],
        {"model": store.load_model(run.base, "model")},
        {**card.to_metrics(), "vae_ref": other_vae.ref},
    )
    with pytest.raises(ValueError, match="different VAEs"):
        run_evaluate(store, CONFIG, [run.base, stray], run.images, run.vae, classifier)
    with pytest.raises(ConfigError, match="knn_k"):
        run_evaluate(store, CONFIG.model_copy(update={"n": 3}), [run.base], run.images, run.vae, classifier)


def test_a_diffusion_model_gets_rows_for_both_samplers_up_to_its_T(evaluated):
    store, run, classifier, _ = evaluated
    ddpm = commit_diffusion(store, run)
    config = CONFIG.model_copy(
        update={
            "flow_steps": (1,),
            "flow_solvers": ("euler",),
            "diffusion_steps": (5, DIFFUSION_T, 2 * DIFFUSION_T),  # beyond T: left out
            "diffusion_samplers": ("ddpm", "ddim"),
        }
    )
    manifest = run_evaluate(store, config, [run.base, ddpm], run.images, run.vae, classifier)
    rows = read_rows(store, manifest)
    cells = by_cell(rows[2:])
    assert set(cells) == {
        ("base", "euler", 1),
        ("ddpm", "ddim", 5),
        ("ddpm", "ddim", DIFFUSION_T),
        ("ddpm", "ddpm", 5),
        ("ddpm", "ddpm", DIFFUSION_T),
    }
    for (model, _sampler, steps), row in cells.items():
        assert row.nfe == steps and row.guidance == 1.0 and math.isfinite(row.fid)
        assert row.stage_key == (ddpm.ref if model == "ddpm" else run.base.ref)
    # Ancestral and deterministic sampling draw different images from the same x_0.
    assert cells[("ddpm", "ddpm", 5)].fid != pytest.approx(cells[("ddpm", "ddim", 5)].fid)
    assert EvaluationCard.from_manifest(manifest).models == {"base": run.base.ref, "ddpm": ddpm.ref}
    assert store.read_json(manifest, "straightness").keys() == {"base"}  # no ODE path for a diffusion model
    report = store.read_bytes(manifest, "report.md").decode()
    assert (
        f"grids/ddpm-ddpm-{DIFFUSION_T}-g1.png" in report
        and "## This run at the published systems' step counts" in report
    )
    assert f"1000 steps not evaluated: nearest evaluated step count {DIFFUSION_T}" in report
    # Only the samplers asked for: the diffusion steps apply to the diffusion samplers named.
    only_ddim = config.model_copy(update={"diffusion_samplers": ("ddim",), "diffusion_steps": (5,)})
    assert {
        (r.model, r.sampler, r.steps)
        for r in compute_evaluation(store, only_ddim, [ddpm], run.images, run.vae, classifier).rows[2:]
    } == {("ddpm", "ddim", 5)}
