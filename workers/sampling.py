"""From a stored generator to pixels: load once, sample latents, decode with the VAE.

Evaluation and serving both go through :class:`Generator`, so a model is sampled the same
way everywhere. The sampler is resolved once, at load, from the manifest's ``sampler``
metric (``ode`` for base and reflow models, ``consistency`` for the distilled student).

Every random draw of image ``i`` of a request comes from its own generator seeded by
``(seed, i)``: the same seed gives the same images whether the request ran alone or was
batched with others, on one actor or many.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from infra.store import Manifest, Store
from models.consistency import consistency_sample
from models.samplers import sample_ode
from workers.vae_stage import load_vae  # also registers the diffusers VAE kind

SAMPLERS = ("ode", "consistency")


@dataclass(frozen=True)
class Request:
    """What to draw: ``n`` images at ``steps``, with labels (None: the null class) and a seed."""

    n: int
    steps: int
    labels: tuple[int, ...] | None = None
    guidance: float = 1.0
    seed: int = 0
    solver: str = "euler"


@dataclass(frozen=True)
class Images:
    pixels: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) the class each image was asked for (num_classes = none)
    nfe: int
    seconds: float


def row_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def to_uint8(x: Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] (N, C, H, W) -> (N, H, W, C) uint8."""
    pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


class Generator:
    """A generator manifest made runnable: network, VAE, latent scale, sampler."""

    def __init__(self, ref: str, net: nn.Module, vae: nn.Module, scale: float, shape: Sequence[int],
                 num_classes: int, sampler: str, device: torch.device | str = "cpu"):
        if sampler not in SAMPLERS:
            raise ValueError(f"{ref}: unknown sampler {sampler!r}; expected one of {SAMPLERS}")
        self.ref, self.sampler = ref, sampler
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.scale, self.shape, self.num_classes = float(scale), tuple(int(s) for s in shape), int(num_classes)

    @classmethod
    def load(cls, store: Store, manifest: Manifest, device: torch.device | str | None = None) -> "Generator":
        metrics = manifest.metrics
        if metrics.get("sampler") not in SAMPLERS:
            raise ValueError(f"{manifest.ref} is not a generator (stage {manifest.stage!r} records no sampler)")
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        vae_manifest = store.get_ref(metrics["vae_ref"])
        return cls(manifest.ref, store.load_model(manifest, "model"), load_vae(store, vae_manifest),
                   metrics["latent_scale"], metrics["latent_shape"], metrics["num_classes"], metrics["sampler"], device)

    # -- noise and labels --------------------------------------------------------------

    def labels_for(self, request: Request) -> Tensor:
        if request.labels is None:
            return torch.full((request.n,), self.num_classes, dtype=torch.long)
        if len(request.labels) != request.n:
            raise ValueError(f"got {len(request.labels)} labels for n={request.n}; give one label per image or none")
        bad = [y for y in request.labels if not 0 <= y <= self.num_classes]
        if bad:
            raise ValueError(f"labels {bad} out of range: use 0..{self.num_classes - 1}, or {self.num_classes} for no class")
        return torch.tensor(request.labels, dtype=torch.long)

    def noise_for(self, request: Request) -> tuple[Tensor, list[Tensor]]:
        """x_0 (N, C, H, W) and, for consistency sampling, the k - 1 re-noising draws."""
        draws = 1 + (request.steps - 1 if self.sampler == "consistency" else 0)
        per_row = []
        for i in range(request.n):
            g = torch.Generator().manual_seed(row_seed(request.seed, i))
            per_row.append(torch.randn((draws, *self.shape), generator=g))
        stacked = torch.stack(per_row, dim=1)  # (draws, N, C, H, W)
        return stacked[0], list(stacked[1:])

    # -- sampling ----------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(self, x_0: Tensor, y: Tensor, steps: int, solver: str = "euler", guidance: float = 1.0,
                       noise: Sequence[Tensor] | None = None) -> tuple[Tensor, int]:
        """Latents x_1 (in the VAE's unscaled units) and the NFE spent."""
        x_0, y = x_0.to(self.device), y.to(self.device)
        if self.sampler == "consistency":
            out = consistency_sample(self.net, x_0, y, steps, noise=[z.to(self.device) for z in noise or []] if steps > 1 else None)
        else:
            out = sample_ode(self.net, x_0, y, steps, solver, guidance)
        return out.x_1 / self.scale, out.nfe

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.device))

    def generate_many(self, requests: Sequence[Request]) -> list[Images]:
        """Several requests with the same steps, solver and guidance in ONE forward pass per step."""
        if not requests:
            return []
        first = requests[0]
        if any((r.steps, r.solver, r.guidance) != (first.steps, first.solver, first.guidance) for r in requests):
            raise ValueError("generate_many needs one steps/solver/guidance; group requests by them first")
        started = time.perf_counter()
        labels = [self.labels_for(r) for r in requests]
        noises = [self.noise_for(r) for r in requests]
        x_0 = torch.cat([x for x, _ in noises])  # (sum n, C, H, W)
        renoise = [torch.cat([extra[i] for _, extra in noises]) for i in range(len(noises[0][1]))]
        z, nfe = self.sample_latents(x_0, torch.cat(labels), first.steps, first.solver, first.guidance, renoise)
        pixels = to_uint8(self.decode(z))
        seconds = time.perf_counter() - started
        out, offset = [], 0
        for request, y in zip(requests, labels):
            out.append(Images(pixels[offset:offset + request.n], y.numpy(), nfe, seconds))
            offset += request.n
        return out

    def generate(self, request: Request) -> Images:
        return self.generate_many([request])[0]
