"""The VAEs a vae stage can hold: fewstep's small KL-VAE, or a local diffusers ``AutoencoderKL``.

Both answer the same interface (``encode(x) -> DiagonalGaussian``, ``decode(z) -> x_hat``,
``.config`` with ``in_channels``, ``latent_channels``, ``downsample``), are stored as
safetensors + a JSON spec, and are loaded with :func:`load_vae`. diffusers is optional: it is
imported only when such a VAE is built, and its absence is a clear error.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

import models.vae  # noqa: F401  (registers the "vae" kind)
from infra.config import ConfigError
from infra.store import Manifest, Store
from models.registry import register_kind
from models.vae import DiagonalGaussian


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


def require_diffusers():
    try:
        import diffusers
    except ImportError:
        raise ConfigError(
            "vae.pretrained needs the optional 'diffusers' package, which is not installed: "
            "pip install 'fewstep[diffusers]' (or pip install diffusers), or unset vae.pretrained to train a VAE"
        ) from None
    return diffusers


class DiffusersVAE(nn.Module):
    """A diffusers ``AutoencoderKL`` behind fewstep's VAE interface."""

    def __init__(self, config: DiffusersVAEConfig, autoencoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        if autoencoder is None:
            autoencoder = require_diffusers().AutoencoderKL.from_config(config.diffusers_config)
        self.autoencoder = autoencoder

    def encode(self, x: Tensor) -> DiagonalGaussian:
        posterior = self.autoencoder.encode(x).latent_dist
        return DiagonalGaussian(posterior.mean, posterior.logvar)

    def decode(self, z: Tensor) -> Tensor:
        return self.autoencoder.decode(z).sample


register_kind("diffusers_vae", DiffusersVAEConfig, DiffusersVAE)


def tuples_to_lists(value: Any) -> Any:
    """Tuples -> lists, recursively (diffusers configs hold tuples; JSON round-trips them as lists)."""
    if isinstance(value, Mapping):
        return {str(k): tuples_to_lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tuples_to_lists(v) for v in value]
    return value


def load_pretrained(folder: str) -> DiffusersVAE:
    """A local ``AutoencoderKL`` folder (or a pipeline folder with a ``vae/`` sub-folder)."""
    diffusers = require_diffusers()
    if os.path.isfile(os.path.join(folder, "vae", "config.json")):
        folder = os.path.join(folder, "vae")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(
            f"vae.pretrained={folder!r} is not a diffusers AutoencoderKL folder (no config.json); "
            "save one with AutoencoderKL.save_pretrained(folder)"
        )
    autoencoder = diffusers.AutoencoderKL.from_pretrained(folder, local_files_only=True)
    raw = {k: v for k, v in dict(autoencoder.config).items() if not k.startswith("_")}
    return DiffusersVAE(DiffusersVAEConfig(tuples_to_lists(raw)), autoencoder).eval()


def folder_fingerprint(folder: str) -> str:
    """sha256 over (relative path, size, mtime) of every file: new weights -> a new stage key."""
    digest = hashlib.sha256()
    for base, _, names in sorted(os.walk(folder)):
        for name in sorted(names):
            path = os.path.join(base, name)
            stat = os.stat(path)
            digest.update(f"{os.path.relpath(path, folder)}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def load_vae(store: Store, vae: Manifest, name: str = "vae") -> nn.Module:
    """The VAE a vae manifest holds (trained or diffusers), in eval mode, on the CPU."""
    return store.load_model(vae, name).eval()
