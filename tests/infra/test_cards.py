"""Stage cards: the one typed way to read what a manifest says about its output."""

from __future__ import annotations

import pytest

from infra.cards import CardError, GeneratorCard, ImagesCard, LatentSpace, LatentsCard, VAECard
from infra.config import ConsistencyConfig, EvaluateConfig, GeneratorConfig, Resources, ServeConfig


def commit(store, stage: str, metrics: dict):
    with store.begin(stage, "k0", config={}) as writer:
        writer.write_json("note", {})
        return writer.commit(metrics=metrics)


def test_a_card_round_trips_through_a_manifest(local_store):
    card = GeneratorCard(family="consistency", steps=80, latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.1,
                         vae_ref="vae/abc", guidance=1.5, teacher_ref="reflow/def", nodes=("n1",))
    manifest = commit(local_store, "consistency", {**card.to_metrics(), "seconds": 3.0})
    back = GeneratorCard.from_manifest(manifest)
    assert back == card  # tuples come back as tuples, extra metrics (seconds) are ignored
    assert back.space == LatentSpace(latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.1, vae_ref="vae/abc")
    # A latents, pairs or generator manifest all describe their latent space the same way.
    assert LatentSpace.from_manifest(manifest).latent_scale == 1.1


def test_a_missing_field_names_the_ref_and_the_field(local_store):
    metrics = LatentsCard(latent_shape=(2, 4, 4), num_classes=0, latent_scale=1.0, vae_ref="vae/x", n_latents=3,
                          n_train=2, n_test=1, dtype="float32").to_metrics()
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
    card = VAECard.from_metrics({"latent_scale": 0.9, "latent_shape": [4, 2, 2], "in_channels": 3, "image_size": 8,
                                 "latent_channels": 4, "downsample": 4, "recon_mse_train": 0.01, "measured_on": 5},
                                "vae/k")
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
