"""A stored generator: written once by its training stage, loaded to sample pixels everywhere.

Evaluation and serving both draw images through :class:`Generator`, so a model is sampled
the same way everywhere: the network, the VAE that decodes it, the latent scale, and a
:class:`~models.sampling.Sampler` object chosen once, from the generator's card.

Every random draw of image ``i`` of a request comes from its own generator seeded by
``(seed, i)`` (:func:`row_seed`): the same seed gives the same images whether the request ran
alone or was batched with others, on one actor or many.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

import models.dit  # noqa: F401  (registers the "dit" kind every generator is built of)
from infra.cards import GeneratorCard, LatentSpace
from infra.config import FreshDiT
from infra.store import Manifest, Store
from models.dit import DiT, dit_config
from models.registry import model_spec
from models.sampling import Sampler, family_samplers, network_passes
from workers.pixels import tensor_to_uint8
from workers.vae_kinds import load_vae


def row_seed(seed: int, index: int) -> int:
    """The seed of draw ``index`` of a request (or a stage) seeded with ``seed``."""
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def seeded_normal(seed: int, ids: Sequence[int], shape: Sequence[int], draws: int = 1) -> Tensor:
    """``draws`` standard normal tensors per row, row ``i`` from its own seed ``(seed, ids[i])``.

    Returns (draws, N, *shape): the same row gets the same draws in any batch.
    """
    rows = [torch.randn((draws, *shape), generator=torch.Generator().manual_seed(row_seed(seed, i))) for i in ids]
    return torch.stack(rows, dim=1)  # (draws, N, *shape)


@dataclass(frozen=True)
class Request:
    """What to draw: ``n`` images at ``steps`` with one sampler, labels (None: no class), a seed."""

    n: int
    steps: int
    sampler: str  # a name of models.sampling.SAMPLERS ("" in a Serve request: the served model's)
    labels: tuple[int, ...] | None = None
    guidance: float = 1.0
    seed: int = 0

    @property
    def group(self) -> tuple:
        """Requests of one group run in one forward pass per step."""
        return (self.steps, self.sampler, self.guidance)


@dataclass(frozen=True)
class Images:
    pixels: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) the class each image was asked for (num_classes = none)
    nfe: int
    seconds: float


# --------------------------------------------------------------------------- networks


def dit_spec(config: FreshDiT, space: LatentSpace) -> dict:
    """A DiT sized for the latents. Label dropout is the objective's job, not the network's."""
    channels, height, _ = space.latent_shape
    net = DiT(dit_config(config.model, input_size=height, in_channels=channels, num_classes=space.num_classes))
    return model_spec(net)


def load_network(store: Store, manifest: Manifest, name: str = "model") -> nn.Module:
    """A generator's network (EMA weights, or ``raw``), in eval mode, on the CPU. An adapter's
    (a LoRA stage's card names the base it goes on) is its base's network with the adapter on."""
    base_ref = GeneratorCard.from_manifest(manifest).adapter_of if GeneratorCard.is_generator(manifest) else None
    if base_ref is None:
        return store.load_model(manifest, name).eval()
    from models.lora import LoRADiTConfig, with_adapter

    spec = store.read_json(manifest, "adapter_spec")
    adapter = store.read_tensors(manifest, "adapter" if name == "model" else "adapter_raw")
    try:
        return with_adapter(
            load_network(store, store.get_ref(base_ref)), LoRADiTConfig(**spec["config"]), adapter
        ).eval()
    except ValueError as error:
        raise ValueError(f"the adapter {manifest.ref} does not go on its base {base_ref}: {error}") from None


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- sampling


class Generator:
    """A generator manifest made runnable: network, VAE, latent scale and its samplers."""

    def __init__(
        self, ref: str, card: GeneratorCard, net: nn.Module, vae: nn.Module, device: torch.device | str = "cpu"
    ):
        self.ref, self.card = ref, card
        self.samplers = {s.name: s for s in family_samplers(card.family, **card.sampler_params())}
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.vae = vae.to(self.device).eval()
        self.scale, self.shape = float(card.latent_scale), tuple(card.latent_shape)
        self.num_classes = int(card.num_classes)

    def network_passes(self, sampler: str, guidance: float) -> int:
        """Network passes per function evaluation of ``sampler`` at ``guidance``: two for classifier-free
        guidance, one for a network that embeds the scale (models/guided_dit.py) or takes none."""
        return network_passes(self.sampler(sampler), guidance, embedded=getattr(self.net, "embeds_guidance", False))

    @classmethod
    def load(cls, store: Store, manifest: Manifest, device: torch.device | str | None = None) -> Generator:
        card = GeneratorCard.from_manifest(manifest)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        return cls(
            manifest.ref, card, load_network(store, manifest), load_vae(store, store.get_ref(card.vae_ref)), device
        )

    def sampler(self, name: str) -> Sampler:
        if name not in self.samplers:
            raise ValueError(
                f"{self.ref} is a {self.card.family} model: sample it with {' or '.join(self.samplers)}, not {name!r}"
            )
        return self.samplers[name]

    # -- noise and labels --------------------------------------------------------------

    def labels_for(self, request: Request) -> Tensor:
        if request.labels is None:
            return torch.full((request.n,), self.num_classes, dtype=torch.long)
        if len(request.labels) != request.n:
            raise ValueError(f"got {len(request.labels)} labels for n={request.n}; give one label per image or none")
        bad = [y for y in request.labels if not 0 <= y <= self.num_classes]
        if bad:
            raise ValueError(
                f"labels {bad} out of range: use 0..{self.num_classes - 1}, or {self.num_classes} for no class"
            )
        return torch.tensor(request.labels, dtype=torch.long)

    def noise_for(self, request: Request) -> Tensor:
        """(draws, n, C, H, W): every draw the request's sampler needs, image i seeded by (seed, i)."""
        draws = self.sampler(request.sampler).noise_draws(request.steps)
        return seeded_normal(request.seed, range(request.n), self.shape, draws)

    # -- sampling ----------------------------------------------------------------------

    @torch.no_grad()
    def sample_latents(
        self, noise: Tensor, y: Tensor, steps: int, sampler: str, guidance: float = 1.0
    ) -> tuple[Tensor, int]:
        """Latents x_1 (in the VAE's unscaled units) and the NFE spent."""
        out = self.sampler(sampler).sample(self.net, list(noise.to(self.device)), y.to(self.device), steps, guidance)
        return out.x_1 / self.scale, out.nfe

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z.to(self.device))

    def generate_many(self, requests: Sequence[Request]) -> list[Images]:
        """Several requests of one group (steps, sampler, guidance) in ONE forward pass per step."""
        if not requests:
            return []
        first = requests[0]
        if any(r.group != first.group for r in requests):
            raise ValueError("generate_many needs one steps/sampler/guidance; group requests by Request.group first")
        started = time.perf_counter()
        labels = [self.labels_for(r) for r in requests]
        noise = torch.cat([self.noise_for(r) for r in requests], dim=1)  # (draws, sum n, C, H, W)
        z, nfe = self.sample_latents(noise, torch.cat(labels), first.steps, first.sampler, first.guidance)
        pixels = tensor_to_uint8(self.decode(z))
        seconds = time.perf_counter() - started
        out, offset = [], 0
        for request, y in zip(requests, labels):
            out.append(Images(pixels[offset : offset + request.n], y.numpy(), nfe, seconds))
            offset += request.n
        return out

    def generate(self, request: Request) -> Images:
        return self.generate_many([request])[0]
