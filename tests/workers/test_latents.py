"""The latents stage: an actor pool of VAE encoders over the images table, on a real local Ray."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch

from drills import kit
from infra.cards import CardError, ImagesCard, LatentsCard
from infra.config import IngestConfig, LatentsConfig, Resources
from infra.tables import table_column_to_numpy, table_metadata
from models.registry import model_spec
from workers.pixels import decode_batch
from workers.stages import s03_latents as latents_module
from workers.stages.s01_ingest import run_ingest
from workers.stages.s03_latents import LatentEncoder, run_latents

SCALE = 1.7  # what the fake VAE stage "measured": the latents stage must copy it, not invent one


@pytest.fixture
def images(ray_local, store):
    return run_ingest(store, IngestConfig(source="digits", image_size=16, limit=24, test_fraction=0.25))


def test_encoder_is_a_plain_callable(store, images):
    vae = kit.tiny_vae()
    table = store.read_table(images, "images").slice(0, 5)
    batch = {name: table.column(name).to_numpy(zero_copy_only=False) for name in ("id", "split", "label", "image")}

    out = LatentEncoder(model_spec(vae), vae.state_dict(), channels=1)(batch)

    assert out["mean"].shape == out["logvar"].shape == (5, 2, 4, 4)
    assert out["mean"].dtype == np.float32
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(decode_batch(batch["image"], 1)))
    np.testing.assert_allclose(out["mean"], expected.mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(out["logvar"], expected.logvar.numpy(), atol=1e-6)
    assert list(out["id"]) == list(batch["id"]) and list(out["label"]) == list(batch["label"])


def test_latents_stage_writes_scaled_metadata_and_is_reused(store, images, monkeypatch):
    vae_manifest, vae = kit.commit_vae(store, [images], metrics=kit.vae_card(latent_scale=SCALE)), kit.tiny_vae()
    config = LatentsConfig(batch_size=8, resources=Resources(workers=2, cpus=0.5))
    manifest = run_latents(store, config, images, vae_manifest)

    table = store.read_table(manifest, "latents")
    source = store.read_table(images, "images")
    assert table.column("id").to_pylist() == source.column("id").to_pylist()  # every image, in id order
    assert table.column("split").to_pylist() == source.column("split").to_pylist()
    assert table.column("label").to_pylist() == source.column("label").to_pylist()
    mean, logvar = table_column_to_numpy(table, "mean"), table_column_to_numpy(table, "logvar")
    assert mean.shape == logvar.shape == (24, 2, 4, 4) and mean.dtype == np.float32
    with torch.no_grad():
        expected = vae.encode(torch.from_numpy(decode_batch(source.column("image").to_pylist(), 1)))
    np.testing.assert_allclose(mean, expected.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(logvar, expected.logvar.numpy(), atol=1e-5)

    meta = table_metadata(table)
    assert meta["fewstep.vae_digest"] == vae_manifest.digest and meta["fewstep.vae_ref"] == vae_manifest.ref
    assert float(meta["fewstep.latent_scale"]) == SCALE
    assert meta["fewstep.dtype"] == "float32" and meta["fewstep.shape"] == "[2, 4, 4]"
    m = LatentsCard.from_manifest(manifest)
    assert m.latent_scale == SCALE and m.latent_shape == (2, 4, 4) and m.vae_ref == vae_manifest.ref
    assert m.n_train + m.n_test == 24 and m.num_classes == ImagesCard.from_manifest(images).num_classes

    # Readable without fewstep: pandas over the stored file gives flat per-row arrays.
    (name,) = manifest.files
    with store.fs.open(f"{store.stage_dir(manifest.stage, manifest.key)}/{manifest.files[name].path}", "rb") as f:
        frame = pd.read_parquet(io.BytesIO(f.read()))
    assert list(frame.columns) == ["id", "split", "label", "mean", "logvar"]
    np.testing.assert_allclose(np.stack(frame["mean"]).reshape(-1, 2, 4, 4), mean)

    monkeypatch.setattr(latents_module, "encoded_dataset", lambda *a, **k: pytest.fail("recomputed a committed stage"))
    assert run_latents(store, config, images, vae_manifest).digest == manifest.digest


def test_blocks_are_capped_so_the_driver_holds_a_bounded_amount(local_store, ray_local, monkeypatch):
    """The driver writes the encoded blocks as they come: a block of at most BLOCK_ROWS rows
    whatever the dataset's size (a fixed block count made the driver's peak grow with N)."""
    images = run_ingest(local_store, IngestConfig(source="digits", image_size=16, limit=24, test_fraction=0.25))
    vae_manifest = kit.commit_vae(local_store, [images], metrics=kit.vae_card(latent_scale=SCALE))
    monkeypatch.setattr(latents_module, "BLOCK_ROWS", 5)
    seen: list[int] = []
    write = latents_module.write_streaming

    def recording(writer, ds, *args, **kwargs):
        class Recorded:
            def iter_batches(self, **options):
                for batch in ds.iter_batches(**options):
                    seen.append(len(batch["id"]))
                    yield batch

        return write(writer, Recorded(), *args, **kwargs)

    monkeypatch.setattr(latents_module, "write_streaming", recording)
    config = LatentsConfig(batch_size=4, resources=Resources(workers=1, cpus=0.5))
    manifest = run_latents(local_store, config, images, vae_manifest)
    assert sum(seen) == 24 and max(seen) <= 5 and len(seen) >= 5, seen
    ids = local_store.read_table(images, "images").column("id").to_pylist()
    assert local_store.read_table(manifest, "latents").column("id").to_pylist() == ids  # order kept across blocks


def test_a_vae_manifest_without_a_scale_is_refused(local_store, ray_local):
    images = run_ingest(local_store, IngestConfig(source="digits", image_size=16, limit=8))
    metrics = kit.vae_card()
    del metrics["latent_scale"]
    vae_manifest = kit.commit_vae(local_store, [images], metrics=metrics)
    with pytest.raises(CardError, match=r"records no 'latent_scale'.*VAECard needs"):
        run_latents(local_store, LatentsConfig(), images, vae_manifest)
