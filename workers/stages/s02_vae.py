"""Stage 2, vae: a KL-VAE for the images, and the latent scale measured on them.

Either trains the small conv KL-VAE of :mod:`models.vae` on the train split, through the one
training loop (:func:`workers.train.fit` with :class:`~models.vae.VAEObjective`), or, when
``vae.pretrained`` names a local diffusers ``AutoencoderKL`` folder, copies that model into
the store. Both ways the stage then measures, on the first ``measure_images`` train images,

    latent_scale = 1 / std(mean of q(z | x))      (DESIGN §2: like SD's 0.18215, never hard-coded)

and the reconstruction error on the test split, and writes the ``vae`` model (safetensors +
spec) and a :class:`~infra.cards.VAECard`. Consumers load it with
:func:`workers.vae_kinds.load_vae`, which also knows the diffusers wrapper.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from infra.cards import ImagesCard, VAECard
from infra.config import ConfigError, VAEConfig
from infra.store import Manifest, StageWriter, Store
from models.registry import build_model, model_spec
from models.vae import VAE, VAEObjective, measure_latent_scale
from models.vae import VAEConfig as VAENetConfig
from workers.batches import PixelBatch
from workers.data import pixel_dataset, read_split
from workers.pixels import to_model_range
from workers.runner import run_stage
from workers.vae_kinds import folder_fingerprint, load_pretrained

log = logging.getLogger("fewstep.vae")

STAGE = "vae"
MEASURE_BATCH = 256


def check_fits(config_channels: int, downsample: int, channels: int, image_size: int, what: str) -> None:
    if config_channels != channels:
        raise ConfigError(
            f"{what} takes {config_channels}-channel images but the images have {channels}: "
            f"set ingest.channels: {config_channels} or use a VAE for {channels} channel(s)"
        )
    if image_size % downsample:
        raise ConfigError(
            f"ingest.image_size={image_size} is not divisible by the VAE's downsampling factor {downsample}: "
            f"use an image size that is a multiple of {downsample}"
        )


@torch.inference_mode()
def encode_and_reconstruct(vae: nn.Module, pixels: np.ndarray, device: torch.device) -> tuple[Tensor, float]:
    """(means (n, c, h, w) on CPU, mean squared reconstruction error of decode(mean))."""
    means, squared, count = [], 0.0, 0
    for start in range(0, len(pixels), MEASURE_BATCH):
        x = torch.from_numpy(to_model_range(pixels[start : start + MEASURE_BATCH])).to(device)  # (B, C, H, W)
        mean = vae.encode(x).mean
        x_hat = vae.decode(mean)
        squared += float((x_hat.float() - x).pow(2).sum())
        count += x.numel()
        means.append(mean.float().cpu())
    return torch.cat(means), squared / max(count, 1)


@dataclass(frozen=True)
class Measured:
    latent_scale: float
    latent_shape: tuple[int, int, int]
    recon_mse: float | None
    recon_mse_train: float
    measured_on: int


def measure(vae: nn.Module, store: Store, images: Manifest, limit: int) -> Measured:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.eval().to(device)
    train = read_split(store, images, "train", limit).pixels
    test = read_split(store, images, "test", limit).pixels
    if len(train) < 2:
        raise ValueError(f"images manifest {images.ref} has {len(train)} train images; the vae stage needs at least 2")
    means, recon_train = encode_and_reconstruct(vae, train, device)
    recon_test = encode_and_reconstruct(vae, test, device)[1] if len(test) else None
    vae.cpu()
    return Measured(
        measure_latent_scale(means), tuple(int(d) for d in means.shape[1:]), recon_test, recon_train, len(train)
    )


def train_vae(store: Store, config: VAEConfig, images: Manifest, key: str, channels: int) -> tuple[VAE, dict]:
    from workers.runtime import ensure_ray
    from workers.train import TrainJob, fit

    ensure_ray()
    net_config = VAENetConfig(
        in_channels=channels,
        latent_channels=config.latent_channels,
        base_channels=config.base_channels,
        downsample=config.downsample,
        beta=config.beta,
    )
    spec = model_spec(VAE(net_config))
    job = TrainJob(
        store=store,
        stage=STAGE,
        key=key,
        model_spec=spec,
        objective=VAEObjective(config.beta),
        config=config,
        adapt_batch=PixelBatch(),
    )
    result = fit(job, pixel_dataset(store, images, "train"))
    vae = build_model(spec)
    vae.load_state_dict(result.model_state)
    final = result.curve[-1]["loss"] if result.curve else None
    return vae, {"steps": result.step, "final_loss": final, "resumed_from": result.resumed_from, "curve": result.curve}


def run_vae(store: Store, config: VAEConfig, images: Manifest) -> Manifest:
    """Train (or import) the VAE for ``images`` and measure its latent scale; returns the vae manifest."""
    card = ImagesCard.from_manifest(images)
    key_config = config.keyed()
    if config.pretrained is not None:
        if not os.path.isdir(config.pretrained):
            raise ConfigError(
                f"vae.pretrained={config.pretrained!r} is not a folder; give a local diffusers AutoencoderKL folder"
            )
        key_config["pretrained_fingerprint"] = folder_fingerprint(config.pretrained)
    else:
        check_fits(card.channels, config.downsample, card.channels, card.image_size, "the VAE")
        if card.n_train < config.batch_size:
            raise ConfigError(
                f"vae.batch_size={config.batch_size} is more than the {card.n_train} train images of {images.ref}: "
                f"set vae.batch_size to at most {card.n_train}, or ingest more images"
            )

    def build(writer: StageWriter, key: str) -> VAECard:
        training: dict = {}
        if config.pretrained is not None:
            vae = load_pretrained(config.pretrained)
            check_fits(
                vae.config.in_channels,
                vae.config.downsample,
                card.channels,
                card.image_size,
                f"the pretrained VAE {config.pretrained!r}",
            )
            training = {
                "pretrained": config.pretrained,
                "pretrained_scaling_factor": vae.config.diffusers_config.get("scaling_factor"),
            }
        else:
            vae, training = train_vae(store, config, images, key, card.channels)
            writer.write_json("curve", {"curve": training.pop("curve")})
        measured = measure(vae, store, images, config.measure_images)
        log.info(
            "vae: latent scale %.4f on %d train images, test recon mse %s",
            measured.latent_scale,
            measured.measured_on,
            measured.recon_mse,
        )
        writer.write_model("vae", vae, model_spec(vae))
        return VAECard(
            latent_scale=measured.latent_scale,
            latent_shape=measured.latent_shape,
            in_channels=card.channels,
            image_size=card.image_size,
            latent_channels=vae.config.latent_channels,
            downsample=vae.config.downsample,
            recon_mse=measured.recon_mse,
            recon_mse_train=measured.recon_mse_train,
            measured_on=measured.measured_on,
            **training,
        )

    return run_stage(store, STAGE, key_config, [images], build, source=__name__)
