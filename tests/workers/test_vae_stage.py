"""The vae stage: trains the small KL-VAE through the shared Ray Train loop, or imports a
diffusers AutoencoderKL, and measures the latent scale on the train images."""

from __future__ import annotations

import sys

import pytest
import torch

from infra.cards import ImagesCard, VAECard
from infra.config import ConfigError, IngestConfig, VAEConfig
from models.registry import build_model
from models.vae import VAE, VAEObjective, vae_loss
from workers.batches import PixelBatch
from workers.pixels import decode_batch
from workers.stages import s02_vae as vae_module
from workers.stages.s01_ingest import run_ingest
from workers.stages.s02_vae import run_vae
from workers.vae_kinds import DiffusersVAE, load_vae


def split_images(store, images, split: str) -> torch.Tensor:
    table = store.read_table(images, "images")
    chosen = [img for img, s in zip(table.column("image").to_pylist(), table.column("split").to_pylist()) if s == split]
    return torch.from_numpy(decode_batch(chosen, ImagesCard.from_manifest(images).channels))  # (N, C, H, W)


@torch.no_grad()
def recon_mse(vae, x: torch.Tensor) -> float:
    return float((vae.decode(vae.encode(x).mean) - x).pow(2).mean())


@pytest.fixture
def digits(ray_local, local_store):
    return run_ingest(local_store, IngestConfig(source="digits", image_size=16, limit=64, test_fraction=0.25))


def test_vae_objective_is_the_vae_loss_on_x_1():
    vae = build_model({"kind": "vae", "config": {"in_channels": 1, "latent_channels": 2, "base_channels": 8}})
    pixels = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    batch = PixelBatch()({"pixels": pixels})
    assert batch["x_1"].min() >= -1 and batch["x_1"].max() <= 1
    torch.manual_seed(3)
    out = VAEObjective(beta=0.5).loss(vae, batch)
    torch.manual_seed(3)
    expected = vae_loss(vae, batch["x_1"], beta=0.5)
    assert torch.allclose(out.loss, expected.loss)
    assert set(out.logs) == {"loss", "recon", "kl"} and not out.logs["loss"].requires_grad
    out.loss.backward()
    assert all(p.grad is not None for p in vae.parameters())


def test_vae_stage_trains_measures_the_scale_and_is_reused(local_store, digits, monkeypatch):
    store = local_store
    config = VAEConfig(steps=16, batch_size=16, base_channels=8, latent_channels=2, lr=3e-3, seed=0)
    manifest = run_vae(store, config, digits)

    assert {"vae", "vae.json", "curve"} <= set(manifest.files)
    vae = load_vae(store, manifest)
    assert isinstance(vae, VAE) and vae.config.in_channels == 1 and vae.config.latent_channels == 2
    m = VAECard.from_manifest(manifest)
    assert m.steps == 16 and m.latent_shape == (2, 4, 4)

    # The scale is 1/std of the posterior means of the train images, under the stored weights.
    train, test = split_images(store, digits, "train"), split_images(store, digits, "test")
    with torch.no_grad():
        means = vae.encode(train).mean.double()
    assert m.measured_on == len(train)
    assert m.latent_scale == pytest.approx(1.0 / means.std(unbiased=False).item(), rel=1e-4)
    assert m.recon_mse == pytest.approx(recon_mse(vae, test), rel=1e-4)

    # It learned: better reconstructions than the same network at its initial weights.
    torch.manual_seed(config.seed)
    initial = build_model(store.read_json(manifest, "vae.json")).eval()
    assert m.recon_mse < 0.8 * recon_mse(initial, test)

    monkeypatch.setattr(vae_module, "train_vae", lambda *a, **k: pytest.fail("retrained a committed VAE"))
    assert run_vae(store, config, digits).digest == manifest.digest


def test_configs_that_cannot_train_are_refused_before_training(local_store, ray_local):
    images = run_ingest(local_store, IngestConfig(source="digits", image_size=12, limit=8))
    with pytest.raises(ConfigError, match="not divisible by the VAE's downsampling factor 8"):
        run_vae(local_store, VAEConfig(downsample=8), images)
    with pytest.raises(ConfigError, match="vae.batch_size=128 is more than the"):
        run_vae(local_store, VAEConfig(downsample=4, batch_size=128), images)


# --------------------------------------------------------------------------- a pretrained diffusers VAE


def tiny_autoencoder(in_channels: int):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.AutoencoderKL(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=4,
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        sample_size=16,
    ).eval()


def test_pretrained_diffusers_vae_is_imported_and_measured(local_store, digits, tmp_path):
    store = local_store
    autoencoder = tiny_autoencoder(in_channels=1)
    autoencoder.save_pretrained(tmp_path / "pretrained")
    manifest = run_vae(store, VAEConfig(pretrained=str(tmp_path / "pretrained")), digits)

    vae = load_vae(store, manifest)
    assert isinstance(vae, DiffusersVAE) and vae.config.downsample == 2
    train = split_images(store, digits, "train")
    with torch.no_grad():
        ours = vae.encode(train)
        theirs = autoencoder.encode(train).latent_dist
    torch.testing.assert_close(ours.mean, theirs.mean)
    torch.testing.assert_close(ours.logvar, theirs.logvar)

    m = VAECard.from_manifest(manifest)
    assert m.latent_shape == (4, 8, 8)
    assert m.latent_scale == pytest.approx(1.0 / ours.mean.double().std(unbiased=False).item(), rel=1e-4)
    assert m.pretrained_scaling_factor == pytest.approx(autoencoder.config.scaling_factor)

    # A 3-channel VAE cannot encode 1-channel images: a config error that says what to set.
    tiny_autoencoder(in_channels=3).save_pretrained(tmp_path / "rgb")
    with pytest.raises(ConfigError, match="ingest.channels: 3"):
        run_vae(store, VAEConfig(pretrained=str(tmp_path / "rgb")), digits)


def test_missing_diffusers_is_a_clear_error(local_store, digits, tmp_path, monkeypatch):
    (tmp_path / "pretrained").mkdir()
    (tmp_path / "pretrained" / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError, match="pip install"):
        run_vae(local_store, VAEConfig(pretrained=str(tmp_path / "pretrained")), digits)
