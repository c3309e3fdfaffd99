"""The vae stage: a KL-VAE for the images, and the latent scale measured on them.

Either trains the small conv KL-VAE of :mod:`models.vae` on the train split, through the
one training loop (:func:`workers.train.fit`) with :class:`VAEObjective`, or, when
``VAEStageConfig.pretrained`` names a local diffusers ``AutoencoderKL`` folder, copies that
model into the store. Both ways the stage then measures, on train images,

    latent_scale = 1 / std(mean of q(z | x))      (DESIGN §2: like SD's 0.18215, never hard-coded)

and the reconstruction error on the test split, and writes the ``vae`` model (safetensors +
spec) with metrics ``latent_scale``, ``recon_mse``, ``latent_shape``, ...

Consumers load the model with :func:`load_vae`, which also knows the diffusers wrapper.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from infra.config import ConfigError, TrainConfig, VAEStageConfig, section_dict
from infra.store import Manifest, StageWriter, Store
from models.objectives import Batch, LossOutput, Objective, require
from models.registry import build_model, model_spec, register_kind
from models.vae import VAE, DiagonalGaussian, VAEConfig, measure_latent_scale, vae_loss
from workers.images import decode_pixels, to_model_range
from workers.stage import run_stage

log = logging.getLogger("fewstep.vae")

STAGE = "vae"
MEASURE_SAMPLES = 4096  # images (first by id) for the scale and the reconstruction error
MEASURE_BATCH = 256
MATERIALIZE_BYTES = 512 * 2**20  # keep decoded training pixels in Ray's object store below this


# --------------------------------------------------------------------------- training pieces


class VAEObjective(Objective):
    """The beta-VAE objective on ``batch["x_1"]`` (images in [-1, 1]): recon + beta * KL."""

    def __init__(self, beta: float):
        self.beta = beta

    def loss(self, model: nn.Module, batch: Batch) -> LossOutput:
        x_1 = require(batch, "x_1", "VAEObjective")
        out = vae_loss(model, x_1, beta=self.beta)  # model may be a DDP wrapper: beta is explicit
        return LossOutput(out.loss, {"loss": out.loss.detach(), "recon": out.recon.detach(), "kl": out.kl.detach()})


@dataclass(frozen=True)
class PixelBatch:
    """Rows {"pixels": uint8 (N, C, H, W)} -> {"x_1": float (N, C, H, W) in [-1, 1]}, on the device.

    x_1 = u / 127.5 - 1
    """

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"x_1": rows["pixels"].float() / 127.5 - 1.0}


def decode_split(batch: Mapping[str, np.ndarray], split: str, channels: int, image_size: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: image rows of ``split`` -> {"pixels": uint8 (n, C, H, W)} (other rows dropped)."""
    chosen = [image for image, s in zip(batch["image"], batch["split"]) if s == split]
    if not chosen:  # the same trailing shape as every other block, so the column stays fixed-shape
        return {"pixels": np.zeros((0, channels, image_size, image_size), dtype=np.uint8)}
    return {"pixels": decode_pixels(chosen, channels).transpose(0, 3, 1, 2)}  # (N, H, W, C) -> (N, C, H, W)


def pixel_dataset(store: Store, images: Manifest, split: str, channels: int, image_size: int):
    import ray.data

    ds = ray.data.read_parquet(store.file_path(images, "images"), filesystem=store.pa_filesystem)
    ds = ds.select_columns(["split", "image"])
    ds = ds.map_batches(decode_split, batch_format="numpy", fn_kwargs={"split": split, "channels": channels, "image_size": image_size})
    rows = int(images.metrics[f"n_{split}"])
    if rows * channels * image_size**2 <= MATERIALIZE_BYTES:
        ds = ds.materialize()  # epochs re-read blocks instead of re-decoding PNGs
    return ds


def train_config(config: VAEStageConfig) -> TrainConfig:
    """The loop's settings for the VAE. No EMA (decay 0: the average is the model itself)."""
    return TrainConfig(
        steps=config.steps, batch_size=config.batch_size, lr=config.lr, warmup_steps=min(50, config.steps // 10),
        ema_decay=0.0, checkpoint_every=max(1, min(500, config.steps)), seed=config.seed,
        resources=config.resources,
    )


# --------------------------------------------------------------------------- a diffusers VAE


@dataclass(frozen=True)
class DiffusersVAEConfig:
    """A diffusers ``AutoencoderKL`` config (its ``config.json`` as a dict)."""

    diffusers_config: dict

    @property
    def in_channels(self) -> int:
        return int(self.diffusers_config.get("in_channels", 3))

    @property
    def latent_channels(self) -> int:
        return int(self.diffusers_config.get("latent_channels", 4))

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.diffusers_config.get("block_out_channels", (64,))) - 1)


def _require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "vae.pretrained needs the optional 'diffusers' package, which is not installed: "
            "pip install 'fewstep[diffusers]' (or pip install diffusers), or unset vae.pretrained to train a VAE"
        ) from None
    return diffusers


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` behind fewstep's VAE interface: ``encode(x) -> DiagonalGaussian``,
    ``decode(z) -> x_hat``, ``.config`` with ``in_channels``, ``latent_channels``, ``downsample``."""

    def __init__(self, config: DiffusersVAEConfig, autoencoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        if autoencoder is None:
            autoencoder = _require_diffusers().AutoencoderKL.from_config(config.diffusers_config)
        self.autoencoder = autoencoder

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = self.autoencoder.encode(x).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z).sample


register_kind("diffusers_vae", DiffusersVAEConfig, DiffusersVAE)


def load_pretrained(folder: str) -> DiffusersVAE:
    """A local ``AutoencoderKL`` folder (or a pipeline folder with a ``vae/`` sub-folder)."""
    diffusers = _require_diffusers()
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        folder = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(
            f"vae.pretrained={folder!r} is not a diffusers AutoencoderKL folder (no config.json); "
            "save one with AutoencoderKL.save_pretrained(folder)"
        )
    autoencoder = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True)
    raw = {k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")}
    config = DiffusersVAEConfig(json_safe(raw))
    return DiffusersVAE(config, autoencoder).eval()


def json_safe(value: Any) -> Any:
    """Tuples -> lists, recursively (diffusers configs hold tuples; JSON round-trips them as lists)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def folder_fingerprint(folder: str) -> str:
    """sha256 over (relative path, size, mtime) of every file: new weights -> a new stage key."""
    digest = hashlib.sha256()
    for base, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(base, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class VAEMeasures:
    latent_scale: float  # 1 / std(means) on train images
    latent_shape: tuple[int, int, int]  # (c, h, w)
    recon_mse: float  # test split, x_hat = decode(mean), in [-1, 1] units^2
    recon_mse_train: float
    measured_on: int  # train images used for the scale


def split_pixels(store: Store, images: Manifest, split: str, channels: int, limit: int) -> np.ndarray:
    """uint8 (n, H, W, C) of the first ``limit`` images of ``split`` (by id), decoded on the driver."""
    table = store.read_table(images, "images", columns=["split", "image"])
    chosen = [image for image, s in zip(table.column("image").to_pylist(), table.column("split").to_pylist())
              if s == split][:limit]
    return decode_pixels(chosen, channels) if chosen else np.zeros((0, 1, 1, channels), np.uint8)


@torch.inference_mode()
def encode_and_reconstruct(vae: nn.Module, pixels: np.ndarray, device: torch.device) -> tuple[Tensor, float]:
    """(means (n, c, h, w) on CPU, mean squared reconstruction error of decode(mean))."""
    means, squared, count = [], 0.0, 0
    for start in range(0, len(pixels), MEASURE_BATCH):
        x = torch.from_numpy(to_model_range(pixels[start:start + MEASURE_BATCH])).to(device)  # (B, C, H, W)
        mean = vae.encode(x).mean
        x_hat = vae.decode(mean)
        squared += float((x_hat.float() - x).pow(2).sum())
        count += x.numel()
        means.append(mean.float().cpu())
    return torch.cat(means), squared / max(count, 1)


def measure(vae: nn.Module, store: Store, images: Manifest, channels: int) -> VAEMeasures:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vae = vae.eval().to(device)
    train = split_pixels(store, images, "train", channels, MEASURE_SAMPLES)
    test = split_pixels(store, images, "test", channels, MEASURE_SAMPLES)
    if len(train) < 2:
        raise ValueError(f"images manifest {images.ref} has {len(train)} train images; the vae stage needs at least 2")
    means, recon_train = encode_and_reconstruct(vae, train, device)
    recon_test = encode_and_reconstruct(vae, test, device)[1] if len(test) else float("nan")
    vae.cpu()
    return VAEMeasures(
        latent_scale=measure_latent_scale(means),
        latent_shape=tuple(int(d) for d in means.shape[1:]),
        recon_mse=recon_test,
        recon_mse_train=recon_train,
        measured_on=len(train),
    )


# --------------------------------------------------------------------------- the stage


def load_vae(store: Store, vae: Manifest, name: str = "vae") -> nn.Module:
    """The VAE a vae manifest holds (trained or diffusers), in eval mode, on the CPU."""
    return store.load_model(vae, name).eval()


def image_format(images: Manifest) -> tuple[int, int]:
    """(channels, image_size) of an images manifest, from the ingest stage's metrics."""
    try:
        return int(images.metrics["channels"]), int(images.metrics["image_size"])
    except KeyError as missing:
        raise ValueError(f"images manifest {images.ref} does not record {missing}; pass the ingest stage's manifest") from None


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


def train_vae(store: Store, config: VAEStageConfig, images: Manifest, key: str, channels: int, image_size: int) -> tuple[VAE, dict]:
    from workers.runtime import ensure_ray
    from workers.train import TrainJob, fit

    ensure_ray()
    vae_config = VAEConfig(in_channels=channels, latent_channels=config.latent_channels,
                           base_channels=config.base_channels, downsample=config.downsample, beta=config.beta)
    spec = model_spec(VAE(vae_config))
    job = TrainJob(store=store, stage=STAGE, key=key, model_spec=spec,
                   objective=VAEObjective(config.beta), config=train_config(config), adapt_batch=PixelBatch())
    result = fit(job, pixel_dataset(store, images, "train", channels, image_size))
    vae = build_model(spec)
    vae.load_state_dict(result.model_state)
    final = result.curve[-1]["loss"] if result.curve else float("nan")
    return vae, {"steps": result.step, "final_loss": final, "resumed_from": result.resumed_from, "curve": result.curve}


def run_vae(store: Store, config: VAEStageConfig, images: Manifest) -> Manifest:
    """Train (or import) the VAE for ``images`` and measure its latent scale; returns the vae manifest."""
    channels, image_size = image_format(images)
    key_config = section_dict(config)
    if config.pretrained is not None:
        if not os.path.isdir(config.pretrained):
            raise ConfigError(f"vae.pretrained={config.pretrained!r} is not a folder; give a local diffusers AutoencoderKL folder")
        key_config["pretrained_fingerprint"] = folder_fingerprint(config.pretrained)
    else:
        check_fits(channels, config.downsample, channels, image_size, "the VAE")
        n_train = int(images.metrics["n_train"])
        if n_train < config.batch_size:
            raise ConfigError(
                f"vae.batch_size={config.batch_size} is more than the {n_train} train images of {images.ref}: "
                f"set vae.batch_size to at most {n_train}, or ingest more images"
            )

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        if config.pretrained is not None:
            vae = load_pretrained(config.pretrained)
            check_fits(vae.config.in_channels, vae.config.downsample, channels, image_size,
                       f"the pretrained VAE {config.pretrained!r}")
            training = {"pretrained": config.pretrained,
                        "pretrained_scaling_factor": vae.config.diffusers_config.get("scaling_factor")}
        else:
            vae, training = train_vae(store, config, images, key, channels, image_size)
            writer.write_json("curve", {"curve": training.pop("curve")})
        measured = measure(vae, store, images, channels)
        log.info("vae: latent scale %.4f on %d train images, test recon mse %.5f",
                 measured.latent_scale, measured.measured_on, measured.recon_mse)
        writer.write_model("vae", vae, model_spec(vae))
        metrics = {**dataclasses.asdict(measured), "latent_shape": list(measured.latent_shape),
                   "in_channels": channels, "image_size": image_size,
                   "latent_channels": vae.config.latent_channels, "downsample": vae.config.downsample, **training}
        if not np.isfinite(metrics["recon_mse"]):
            metrics["recon_mse"] = None  # no test split
        return metrics

    return run_stage(store, STAGE, key_config, [images], build)
