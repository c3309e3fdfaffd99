"""Stage cards: the one typed way to read what a manifest says about its output."""

from __future__ import annotations

import pytest

from infra.cards import CardError, GeneratorCard, ImagesCard, LatentsCard, LatentSpace, VAECard
from infra.config import (
    ConfigError,
    ConsistencyConfig,
    DDPMConfig,
    EvaluateConfig,
    GeneratorConfig,
    Resources,
    ServeConfig,
    load_config,
)
from models.sampling import family_samplers


def commit(store, stage: str, metrics: dict):
    with store.begin(stage, "k0", config={}) as writer:
        writer.write_json("note", {})
        return writer.commit(metrics=metrics)


def test_a_card_round_trips_through_a_manifest(local_store):
    card = GeneratorCard(
        family="consistency",
        steps=80,
        latent_shape=(4, 4, 4),
        num_classes=10,
        latent_scale=1.1,
        vae_ref="vae/abc",
        guidance=1.5,
        teacher_ref="reflow/def",
        nodes=("n1",),
    )
    manifest = commit(local_store, "consistency", {**card.to_metrics(), "seconds": 3.0})
    back = GeneratorCard.from_manifest(manifest)
    assert back == card  # tuples come back as tuples, extra metrics (seconds) are ignored
    assert back.space == LatentSpace(latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.1, vae_ref="vae/abc")
    # A latents, pairs or generator manifest all describe their latent space the same way.
    assert LatentSpace.from_manifest(manifest).latent_scale == 1.1


def test_a_missing_field_names_the_ref_and_the_field(local_store):
    metrics = LatentsCard(
        latent_shape=(2, 4, 4),
        num_classes=0,
        latent_scale=1.0,
        vae_ref="vae/x",
        n_latents=3,
        n_train=2,
        n_test=1,
        dtype="float32",
    ).to_metrics()
    del metrics["latent_scale"]
    manifest = commit(local_store, "latents", metrics)
    with pytest.raises(CardError, match=r"latents/k0 records no 'latent_scale', which its LatentsCard needs"):
        LatentsCard.from_manifest(manifest)


def test_a_manifest_of_another_stage_is_refused(local_store):
    manifest = commit(local_store, "vae", {})
    with pytest.raises(CardError, match=r"vae/k0 is a 'vae' output; a ImagesCard comes from 'ingest'"):
        ImagesCard.from_manifest(manifest)
    assert not GeneratorCard.is_generator(manifest)


def test_optional_fields_default_and_say_so():
    card = VAECard.from_metrics(
        {
            "latent_scale": 0.9,
            "latent_shape": [4, 2, 2],
            "in_channels": 3,
            "image_size": 8,
            "latent_channels": 4,
            "downsample": 4,
            "recon_mse_train": 0.01,
            "measured_on": 5,
        },
        "vae/k",
    )
    assert card.recon_mse is None and card.pretrained is None and card.latent_shape == (4, 2, 2)


def test_resources_never_reach_a_stage_key():
    """Every section's Resources are left out by type: moving a stage does not recompute it."""
    for section in (GeneratorConfig(), ConsistencyConfig(), EvaluateConfig(), ServeConfig()):
        moved = section.model_copy(update={"resources": Resources(workers=2, cpus=3, gpus=1)})
        assert "resources" not in section.keyed() and section.keyed() == moved.keyed()
    assert GeneratorConfig(steps=5).keyed() != GeneratorConfig(steps=6).keyed()


def test_the_global_batch_must_split_over_the_workers():
    GeneratorConfig(batch_size=64, resources=Resources(workers=4))
    with pytest.raises(ValueError, match="does not split evenly over resources.workers=3"):
        GeneratorConfig(batch_size=64, resources=Resources(workers=3))


def test_a_diffusion_card_names_its_schedule_and_its_samplers_use_it(local_store):
    card = GeneratorCard(
        family="diffusion",
        steps=10,
        latent_shape=(2, 4, 4),
        num_classes=3,
        latent_scale=1.0,
        vae_ref="vae/abc",
        diffusion_schedule="cosine",
        diffusion_steps=200,
    )
    back = GeneratorCard.from_manifest(commit(local_store, "ddpm", card.to_metrics()))
    assert back == card and GeneratorCard.is_generator(commit(local_store, "ddpm", card.to_metrics()))
    samplers = family_samplers(back.family, **back.sampler_params())
    assert [(s.name, s.schedule_name, s.max_steps) for s in samplers] == [
        ("ddim", "cosine", 200),
        ("ddpm", "cosine", 200),
    ]
    # The other families' parameters pass as before, and a card without diffusion fields gives none.
    student = GeneratorCard(
        family="consistency",
        steps=1,
        latent_shape=(2, 4, 4),
        num_classes=3,
        latent_scale=1.0,
        vae_ref="vae/abc",
        renoise_coupling=1.0,
        num_intervals=8,
    )
    assert student.sampler_params() == {"coupling": 1.0, "num_intervals": 8}
    (consistency,) = family_samplers(student.family, **student.sampler_params())
    assert consistency.max_steps == 8 and consistency.noise_draws(3) == 1


def test_the_ddpm_section_is_off_by_default_and_its_steps_are_checked_against_T():
    for preset in ("quick", "default"):
        cfg = load_config(preset)
        assert not cfg.ddpm.enabled and cfg.ddpm.schedule == "linear" and cfg.ddpm.diffusion_steps == 1000
        assert cfg.evaluate.diffusion_steps == (10, 50, 250, 1000) and cfg.evaluate.diffusion_samplers == (
            "ddpm",
            "ddim",
        )
    assert DDPMConfig(steps=5).keyed() != DDPMConfig(steps=5, schedule="cosine").keyed()
    with pytest.raises(ConfigError, match=r"evaluate.diffusion_steps \[1000\] go beyond .*ddpm.diffusion_steps=500"):
        load_config(overrides={"ddpm": {"diffusion_steps": 500}})
    load_config(overrides={"ddpm": {"diffusion_steps": 500}, "evaluate": {"diffusion_steps": [5, 500]}})
    with pytest.raises(ConfigError, match="needs diffusion_steps > 20, got 20"):
        load_config(overrides={"ddpm": {"diffusion_steps": 20}, "evaluate": {"diffusion_steps": [10]}})
    with pytest.raises(ConfigError, match="diffusion_samplers"):
        load_config(overrides={"evaluate": {"diffusion_samplers": ["euler"]}})
    with pytest.raises(ConfigError, match=r"diffusion_steps must be step counts in 1\.\.1000, got \[0\]"):
        load_config(overrides={"evaluate": {"diffusion_steps": [0, 10]}})
