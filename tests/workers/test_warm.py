"""Warm starts (workers.warm): what a retrain builds on, checked on small real stores.

Without Ray: the stage keys of a run that does not warm-start are main's, computed both ways; the
served lineage, a corrupt parent (an error before training, or scratch when asked); the VAE's
verdict. With a real local Ray: a warm-started base model begins at its parent's weights and
EMA; the served VAE is kept for more of the same images and not for images unlike its own."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from drills import kit
from infra.cards import GeneratorCard, ImagesCard, LatentsCard, PairsCard
from infra.config import GeneratorConfig, IngestConfig, LatentsConfig, RetrainConfig, VAEConfig, load_config
from infra.errors import WarmStartError
from infra.store import SERVING_POINTER, Manifest, Store
from infra.version import code_version
from models.registry import build_model
from workers.generator import dit_spec
from workers.stages.s04_base import run_base
from workers.stages.s06_reflow import run_reflow
from workers.stages.s07_consistency import run_consistency
from workers.warm import (
    WARM_KEY,
    load_warm_start,
    plan_retrain,
    served_lineage,
    vae_verdict,
    warm_start,
)

SPACE = dict(latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.0, vae_ref="vae/v0")


def commit(store: Store, stage: str, key: str, metrics: dict, inputs=(), config=None, spec=None, seed=0) -> Manifest:
    """A committed stage output with the card ``metrics``; ``spec``: with a DiT's ``raw`` and ``model``
    (EMA) weights, different from each other, as a generator stage writes them."""
    with store.begin(stage, key, config=config or {}, inputs=list(inputs)) as writer:
        if spec is not None:
            torch.manual_seed(seed)
            raw = build_model(spec)
            ema = build_model(spec)
            with torch.no_grad():
                for p in ema.parameters():
                    p.add_(0.01)
            writer.write_model("raw", raw, spec)
            writer.write_model("model", ema, spec)
        return writer.commit(metrics=metrics)


def generator(**fields) -> dict:
    return GeneratorCard(family="flow", steps=5, **SPACE, **fields).to_metrics()


def latents_card() -> dict:
    return LatentsCard(n_latents=100, n_train=80, n_test=20, dtype="float32", **SPACE).to_metrics()


def main_key(store: Store, stage: str, section, inputs, module: str, **extra) -> str:
    """The key main computes (workers.runner.run_stage): the section's values, the extras, the inputs, the code."""
    return store.stage_key(stage, {**section.keyed(), **extra}, inputs, code_version(module))


@pytest.fixture
def quick():
    cfg = load_config("quick")
    # consistency's guidance as the flow hands it to the stage: a number
    return cfg.model_copy(update={"consistency": cfg.consistency.model_copy(update={"guidance": 2.0})})


def test_a_run_that_does_not_warm_start_keys_every_generator_stage_as_main_does(local_store, quick):
    """Commit each generator stage at the key main computes; the stages, given no warm start (scratch, no
    lineage, or a parent trained on these very inputs), find them there instead of training."""
    store, cfg = local_store, quick
    latents = commit(store, "latents", "l1", latents_card())
    spec = dit_spec(cfg.base, LatentsCard.from_manifest(latents))
    base = commit(
        store, "base", main_key(store, "base", cfg.base, [latents], "workers.stages.s04_base"), generator(), [latents],
        spec=spec,
    )  # fmt: skip
    pairs = PairsCard(pairs=64, teacher_ref=base.ref, round=1, solver="euler", steps=2, guidance=2.0, **SPACE)
    pairs = commit(store, "pairs", "p1", pairs.to_metrics(), [base])
    reflow_key = main_key(store, "reflow", cfg.reflow, [base, pairs], "workers.stages.s06_reflow", round=1)
    reflow = commit(store, "reflow", reflow_key, generator(round=1, teacher_ref=base.ref), [base, pairs], spec=spec)
    student_key = main_key(store, "consistency", cfg.consistency, [reflow, latents], "workers.stages.s07_consistency")
    student = commit(store, "consistency", student_key, generator(teacher_ref=reflow.ref), [reflow, latents], spec=spec)

    # The flow's way for each stage: the warm start a stage is handed, from each reason it has none.
    store.put_pointer(SERVING_POINTER, student.ref)
    assert plan_retrain(store, RetrainConfig(mode="scratch")).lineage is None
    assert warm_start(store, None, [latents], 10) is None
    # The served lineage's own outputs, on the same inputs: a re-run repeats their (scratch) start.
    assert warm_start(store, base, [latents], 10) is None
    assert warm_start(store, student, [reflow, latents], 10) is None

    assert run_base(store, cfg.base, latents, None).ref == base.ref
    assert run_reflow(store, cfg.reflow, base, pairs, 1, None).ref == reflow.ref
    assert run_consistency(store, cfg.consistency, reflow, latents, None).ref == student.ref

    # A warm start (new latents) is keyed by the section's values, its parent and its steps, nothing else.
    grown = commit(store, "latents", "l2", latents_card())
    warm = warm_start(store, base, [grown], 10)
    assert warm is not None and warm.key == {WARM_KEY: {"parent": base.ref, "steps": 10}}
    warm_key = main_key(store, "base", cfg.base, [grown], "workers.stages.s04_base", **warm.key)
    assert warm_key != main_key(store, "base", cfg.base, [grown], "workers.stages.s04_base")
    config = {**cfg.base.keyed(), **warm.key}  # as run_stage records it
    warmed = commit(store, "base", warm_key, generator(parent_ref=base.ref), [grown], config, spec=spec)
    assert run_base(store, cfg.base, grown, warm).ref == warmed.ref
    # Its re-run (the warm model now served, the same latents) repeats the same start: the same key.
    again = warm_start(store, store.get_ref(warmed.ref), [grown], 99)
    assert again is not None and again.key == warm.key


def served_lineage_store(store: Store) -> tuple[Manifest, Manifest, Manifest]:
    """vae, base and a consistency student distilled from it, the student served."""
    vae = kit.commit_vae(store)
    spec = dit_spec(GeneratorConfig(), LatentsCard(n_latents=1, n_train=1, n_test=0, dtype="float32", **SPACE))
    metrics = dict(SPACE, vae_ref=vae.ref)
    base = commit(store, "base", "b", GeneratorCard(family="flow", steps=5, **metrics).to_metrics(), spec=spec)
    student = GeneratorCard(family="consistency", steps=5, teacher_ref=base.ref, **metrics)
    student = commit(store, "consistency", "c", student.to_metrics(), [base], spec=spec, seed=1)
    store.put_pointer(SERVING_POINTER, student.ref)
    return vae, base, student


def test_the_served_lineage_and_its_parents_weights(local_store):
    vae, base, student = served_lineage_store(local_store)
    lineage = served_lineage(local_store)
    assert lineage.served == student.ref and lineage.vae.ref == vae.ref
    assert {k: m.ref for k, m in lineage.generators.items()} == {"consistency": student.ref, "base": base.ref}
    plan = plan_retrain(local_store, RetrainConfig())
    assert plan.parent("base").ref == base.ref and plan.as_record()["vae"] == vae.ref
    # A warm start holds the parent's raw weights and its EMA, tensor for tensor.
    warm = load_warm_start(local_store, base, 7)
    raw, ema = local_store.load_model(base, "raw").state_dict(), local_store.load_model(base, "model").state_dict()
    assert warm.raw.keys() == raw.keys() and all(torch.equal(warm.raw[k], raw[k]) for k in raw)
    assert all(torch.equal(warm.ema[k], ema[k]) for k in ema)
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two are told apart
    loop = warm.loop_config(GeneratorConfig(ema_warmup=10))
    assert (loop.steps, loop.ema_warmup) == (7, 0)


def test_a_corrupt_parent_fails_before_training_or_falls_back_to_scratch(local_store, caplog):
    _, base, _ = served_lineage_store(local_store)
    kit.flip_byte(local_store, base, "raw")
    with pytest.raises(WarmStartError) as raised:
        plan_retrain(local_store, RetrainConfig(mode="warm"))
    message = str(raised.value)
    assert base.ref in message and "Nothing was trained" in message and "warm_or_scratch" in message
    assert "\n" not in message and "Traceback" not in message
    with caplog.at_level(logging.WARNING, logger="fewstep.warm"):
        plan = plan_retrain(local_store, RetrainConfig(mode="warm_or_scratch"))
    assert plan.lineage is None and base.ref in plan.reason
    assert any("training from scratch" in r.getMessage() for r in caplog.records)
    # Scratch never reads the lineage.
    assert plan_retrain(local_store, RetrainConfig(mode="scratch")).lineage is None


def test_the_vae_verdict_keeps_within_the_tolerance_and_its_interval():
    same = torch.full((50,), 0.010) + 0.002 * torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert vae_verdict("vae/x", 0.010, same, 0.1).kept
    worse = same * 3
    verdict = vae_verdict("vae/x", 0.010, worse, 0.1)
    assert verdict.action == "retrain" and verdict.measured_low > 0.011 and "beyond the tolerance" in verdict.reason
    # Two noisy images cannot tell: kept.
    assert vae_verdict("vae/x", 0.010, torch.tensor([0.001, 0.05]), 0.1).kept
    assert vae_verdict("vae/x", 0.010, torch.zeros(0), 0.1).new_test_images == 0


# --------------------------------------------------------------------------- with Ray


SIZE = 16
TRAIN = dict(batch_size=16, checkpoint_every=4, warmup_steps=0, resources={"workers": 0})


def noise_images(folder, count: int) -> None:
    """Salt-and-pepper images: nothing like digits."""
    rng = np.random.default_rng(7)
    for i in range(count):
        path = folder / "0" / f"noise-{i:04d}.png"
        Image.fromarray((rng.integers(0, 2, size=(8, 8)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope="module")
def digits(ray_local, tmp_path_factory):
    """A folder of 150 digits, ingested, its VAE trained and its latents encoded."""
    from workers.stages.s01_ingest import run_ingest
    from workers.stages.s02_vae import run_vae
    from workers.stages.s03_latents import run_latents

    root = tmp_path_factory.mktemp("warm")
    folder = root / "digits"
    kit.builtin_folder(folder, "digits", 0, 150)
    store = Store.open(str(root / "store"))
    ingest = IngestConfig(source=str(folder), image_size=SIZE, test_fraction=0.3)
    images = run_ingest(store, ingest)
    vae_config = VAEConfig(steps=60, base_channels=8, lr=2e-3, **TRAIN)
    vae = run_vae(store, vae_config, images)
    latents = run_latents(store, LatentsConfig(), images, vae)
    return store, folder, ingest, vae_config, images, vae, latents


def test_a_warm_started_base_begins_at_its_parents_weights_and_ema(digits):
    store, *_, latents = digits
    parent = run_base(store, GeneratorConfig(steps=4, **TRAIN), latents)
    raw, ema = store.load_model(parent, "raw").state_dict(), store.load_model(parent, "model").state_dict()
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    # A learning rate too small to move a weight and an EMA that keeps its start: what comes out went in.
    still = GeneratorConfig(steps=8, lr=1e-12, ema_decay=1.0, ema_warmup=0, seed=3, **TRAIN)
    warm = run_base(store, still, latents, load_warm_start(store, parent, 2))
    card = GeneratorCard.from_manifest(warm)
    assert (card.parent_ref, card.steps) == (parent.ref, 2)
    assert store.get_ref(warm.ref).config[WARM_KEY] == {"parent": parent.ref, "steps": 2}
    warm_raw, warm_ema = store.load_model(warm, "raw").state_dict(), store.load_model(warm, "model").state_dict()
    assert all(torch.allclose(warm_raw[k], raw[k], atol=1e-6) for k in raw)
    assert all(torch.equal(warm_ema[k], ema[k]) for k in ema)
    # The same section from scratch starts elsewhere.
    cold = store.load_model(run_base(store, still, latents), "raw").state_dict()
    assert GeneratorCard.from_manifest(store.list_manifests("base")[-1]).parent_ref is None
    assert not all(torch.allclose(cold[k], raw[k], atol=1e-3) for k in raw)


def test_the_served_vae_is_kept_for_more_digits_and_not_for_noise(digits, tmp_path):
    import shutil

    from workers.stages.s01_ingest import run_ingest
    from workers.warm import check_vae

    store, folder, ingest, vae_config, images, vae, _ = digits
    limit = vae_config.measure_images
    keyed = vae_config.keyed()
    # 10% more digits, as the folder grows week to week.
    grown = tmp_path / "grown"
    shutil.copytree(folder, grown)
    kit.builtin_folder(grown, "digits", 150, 165)
    more = run_ingest(store, ingest.model_copy(update={"source": str(grown)}))
    kept = check_vae(store, vae, more, keyed, 0.1, limit)
    assert kept.kept and kept.new_test_images > 0 and kept.measured_mse is not None
    assert ImagesCard.from_manifest(more).n_images == 165
    # Images unlike any it saw: a new VAE (a full retrain).
    noisy = tmp_path / "noisy"
    shutil.copytree(folder, noisy)
    noise_images(noisy, 30)
    other = run_ingest(store, ingest.model_copy(update={"source": str(noisy)}))
    forced = check_vae(store, vae, other, keyed, 0.1, limit)
    assert forced.action == "retrain" and forced.measured_low > forced.recorded_mse * 1.1, forced
    # Another vae section: not kept either; the same images: the vae stage's own output.
    changed = check_vae(store, vae, more, {**keyed, "beta": keyed["beta"] * 2}, 0.1, limit)
    assert changed.action == "retrain" and "beta" in changed.reason
    assert check_vae(store, vae, images, keyed, 0.1, limit).action == "same_data"
