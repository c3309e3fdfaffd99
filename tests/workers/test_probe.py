"""The probe after each generator stage: its verdict on figures, its plan, and the stage end to end
on a tiny stored run (real digits, a trained classifier, random-weight generators that learned nothing)."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from evaluate_fixtures import commit, commit_tiny_run  # noqa: E402

from infra.cards import LEARNED, FeaturesCard, GeneratorCard, ImagesCard, ProbeCard  # noqa: E402
from infra.config import ProbeConfig  # noqa: E402
from infra.store import Store  # noqa: E402
from models.classifier import Classifier, ClassifierConfig, train_classifier  # noqa: E402
from workers.data import read_split  # noqa: E402
from workers.evaluation.quality import Figures, learned_verdict, shortfalls  # noqa: E402
from workers.evaluation.scoring import accuracy  # noqa: E402
from workers.pixels import to_model_range  # noqa: E402
from workers.stages.s12_probe import probe_best_guidance, probe_plan, run_probe  # noqa: E402

pytestmark = pytest.mark.timeout(600)

# The measured base model: chance-level, far above the ceiling.
FAILED = Figures(fid=364.0, floor_fid=7.4, ceiling_fid=14.5, class_accuracy=0.15, chance=0.1, real_accuracy=0.99)
GOOD = Figures(fid=40.0, floor_fid=7.4, ceiling_fid=14.5, class_accuracy=0.8, chance=0.1, real_accuracy=0.99)


def test_a_model_near_chance_gets_a_warning_that_names_the_figures_and_the_fix():
    verdict = learned_verdict("base/ab12cd34ef", FAILED, 2.0, 10.0, at="at its best guidance 2")
    assert verdict.startswith("base/ab12…: class accuracy 0.15 at its best guidance 2 (chance 0.10, real images 0.99")
    assert "FID 364 at its best guidance 2 is 356.6 above the floor 7.4" in verdict
    assert "this model has not learned the data; raise base.steps or use a larger base.model" in verdict
    # Each bar on its own; the fix follows the stage.
    assert len(shortfalls(FAILED, 2.0, None)) == 1 and "class accuracy" in shortfalls(FAILED, 2.0, None)[0]
    assert len(shortfalls(FAILED, 0.0, 10.0)) == 1 and "FID" in shortfalls(FAILED, 0.0, 10.0)[0]
    assert "consistency.steps" in learned_verdict("consistency/0123456789", FAILED, 2.0, 10.0)


def test_a_model_that_learned_passes_and_unmeasured_figures_are_not_held_against_it():
    assert learned_verdict("base/ab12cd34ef", GOOD, 2.0, 10.0) == LEARNED
    # 0.19 < 2 x chance fails; 0.21 passes; FID excess 70 vs 10 x 7.1 = 71: passes.
    assert learned_verdict("base/x", Figures(77.4, 7.4, 14.5, 0.19, 0.1), 2.0, 10.0) != LEARNED
    assert learned_verdict("base/x", Figures(77.4, 7.4, 14.5, 0.21, 0.1), 2.0, 10.0) == LEARNED
    assert learned_verdict("base/x", Figures(79.0, 7.4, 14.5, 0.21, 0.1), 2.0, 10.0) != LEARNED
    # Unlabelled (no chance, no classifier) and a ceiling not above the floor: nothing to hold.
    assert learned_verdict("base/x", Figures(900.0, 7.4, 7.0, None, None), 2.0, 10.0) == LEARNED


def test_the_plan_sweeps_guidance_only_where_the_sampler_takes_it():
    config = ProbeConfig(guidance=(4.0, 1.0, 2.0), steps=16, student_steps=4)
    space = dict(latent_shape=(2, 4, 4), num_classes=10, latent_scale=1.0, vae_ref="vae/v")
    flow = probe_plan(GeneratorCard(family="flow", steps=0, **space), config)
    assert (flow.sampler.name, flow.steps, flow.scales) == ("euler", 16, (1.0, 2.0, 4.0))
    student = probe_plan(GeneratorCard(family="consistency", steps=0, guidance=2.0, num_intervals=3, **space), config)
    assert (student.sampler.name, student.steps, student.scales) == ("consistency", 3, (2.0,))
    unlabelled = probe_plan(GeneratorCard(family="flow", steps=0, **{**space, "num_classes": 0}), config)
    assert unlabelled.scales == (1.0,)


def commit_classifier(store: Store, images):
    """A features manifest as the features stage writes it, its classifier trained in plain PyTorch (seconds)."""
    card = ImagesCard.from_manifest(images)
    train, test = read_split(store, images, "train"), read_split(store, images, "test")
    torch.manual_seed(0)
    net = Classifier(ClassifierConfig(in_channels=1, image_size=16, num_classes=card.num_classes, width=8))
    x, y = torch.from_numpy(to_model_range(train.pixels)), torch.from_numpy(train.labels)
    train_classifier(net, x, y, steps=150, batch_size=32, lr=3e-3, generator=torch.Generator().manual_seed(0))
    features = FeaturesCard(
        kind="classifier",
        num_classes=card.num_classes,
        feature_dim=net.feature_dim,
        images_ref=images.ref,
        n_train=len(train.labels),
        n_test=len(test.labels),
        final_loss=None,
        steps=150,
        test_accuracy=accuracy(net, test.pixels, test.labels),
    )
    return commit(store, "features", {"seed": 0}, [images], {"features": net.eval()}, features.to_metrics())


@pytest.fixture(scope="module")
def tiny(ray_local, tmp_path_factory):
    store = Store.open(str(tmp_path_factory.mktemp("probe") / "store"))
    run = commit_tiny_run(store)
    return store, run, commit_classifier(store, run.images)


def test_the_probe_stage_scores_each_scale_beside_the_references_and_warns(tiny):
    store, run, classifier = tiny
    config = ProbeConfig(n=40, guidance=(1.0, 3.0), steps=2, student_steps=2, fid_resamples=20)
    manifest = run_probe(store, config, run.base, run.images, run.vae, classifier)
    card = ProbeCard.from_manifest(manifest)
    assert manifest.stage == "probe" and card.model_ref == run.base.ref and card.model_stage == "base"
    assert (card.sampler, card.steps, card.n, card.chance) == ("euler", 2, 40, 0.1)
    assert [s["guidance"] for s in card.scales] == [1.0, 3.0]
    for s in card.scales:
        assert s["fid_low"] <= s["fid_corrected"] <= s["fid_high"]  # the value its interval is built around
        assert 0.0 <= s["accuracy_low"] <= s["class_accuracy"] <= s["accuracy_high"] <= 1.0
    best = min(card.scales, key=lambda s: s["fid"])
    assert card.best_guidance == best["guidance"] == probe_best_guidance(store, manifest.ref)
    assert card.floor_fid < card.ceiling_fid and card.floor_accuracy > 0.5  # the classifier reads real digits
    assert {"grids/guidance-1.png", "grids/guidance-3.png"} <= set(manifest.files)
    # Random weights learned nothing: near chance, and the warning says what to change.
    assert not card.learned and best["class_accuracy"] < 2 * card.chance, card.scales
    assert "has not learned the data; raise base.steps or use a larger base.model" in card.verdict
    # Keyed: the same inputs come back from the store; other thresholds are another probe.
    assert run_probe(store, config, run.base, run.images, run.vae, classifier).ref == manifest.ref
    lenient = config.model_copy(update={"min_accuracy_over_chance": 0.0, "max_excess_over_ceiling": None})
    passed = ProbeCard.from_manifest(run_probe(store, lenient, run.base, run.images, run.vae, classifier))
    assert passed.learned and passed.scales == card.scales


def test_a_student_is_probed_once_at_its_own_steps_and_bad_input_is_named(tiny):
    store, run, classifier = tiny
    config = ProbeConfig(n=40, guidance=(1.0, 3.0), steps=2, student_steps=2, fid_resamples=20)
    card = ProbeCard.from_manifest(run_probe(store, config, run.consistency, run.images, run.vae, classifier))
    assert (card.sampler, card.steps, [s["guidance"] for s in card.scales]) == ("consistency", 2, [1.0])
    assert "consistency.steps" in card.verdict
    with pytest.raises(ValueError, match="not a generator"):
        run_probe(store, config, run.vae, run.images, run.vae, classifier)
    with pytest.raises(ValueError, match="feature space"):
        run_probe(store, config, run.base, run.images, run.vae, None)
