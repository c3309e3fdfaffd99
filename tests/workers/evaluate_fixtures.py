"""A tiny stored run for evaluation tests: real digits through the ingest stage, then a VAE and
three generators (base, reflow round 1, consistency) committed directly with random weights,
and with ``diffusion=True`` a fourth, a diffusion-family ``ddpm`` model (:func:`commit_diffusion`).

Training is not what these tests check, so no Ray Train fit is spent on it: the manifests carry
exactly what the generative stages write (the same spec builder and metric helpers), and the
weights are random but not zero (AdaLN-Zero would make every velocity 0 and every model alike).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from infra.cards import GeneratorCard, ImagesCard, LatentSpace, VAECard
from infra.config import GeneratorConfig, IngestConfig
from infra.store import Manifest, Store
from models.registry import build_model, model_spec
from models.vae import VAE, VAEConfig
from workers.generator import dit_spec
from workers.stages.s01_ingest import run_ingest

LATENT_SHAPE = (2, 4, 4)


@dataclass(frozen=True)
class TinyRun:
    images: Manifest
    vae: Manifest
    base: Manifest
    reflow: Manifest
    consistency: Manifest
    ddpm: Manifest | None = None  # with commit_tiny_run(..., diffusion=True)

    @property
    def generators(self) -> list[Manifest]:
        return [self.base, self.reflow, self.consistency] + ([self.ddpm] if self.ddpm is not None else [])


def commit(store: Store, stage: str, config: dict, inputs: list[Manifest], models: dict, metrics: dict) -> Manifest:
    key = store.stage_key(stage, config, inputs)
    with store.begin(stage, key, config=config, inputs=inputs) as writer:
        for name, module in models.items():
            writer.write_model(name, module, model_spec(module))
        return writer.commit(metrics=metrics)


def random_generator(spec: dict, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = build_model(spec)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


DIFFUSION_T = 100  # the tiny diffusion model's training steps: evaluation tests sample it at up to T


def commit_diffusion(store: Store, run: TinyRun, seed: int = 4) -> Manifest:
    """A random-weight diffusion-family generator (stage ``ddpm``) on the run's VAE, as s08_ddpm writes it."""
    base = GeneratorCard.from_manifest(run.base)
    net = random_generator(dit_spec(GeneratorConfig(model="DiT-T/2"), base.space), seed)
    card = GeneratorCard(
        family="diffusion", steps=0, diffusion_schedule="linear", diffusion_steps=DIFFUSION_T, **base.space_fields()
    )
    return commit(store, "ddpm", {"seed": seed}, [run.vae], {"model": net, "raw": net}, card.to_metrics())


def commit_tiny_run(store: Store, vae_seed: int = 0, diffusion: bool = False) -> TinyRun:
    images = run_ingest(store, IngestConfig(source="digits", limit=120, image_size=16))
    torch.manual_seed(vae_seed)
    vae = VAE(VAEConfig(in_channels=1, latent_channels=LATENT_SHAPE[0], base_channels=8, downsample=4))
    vae_card = VAECard(
        latent_scale=1.0,
        latent_shape=LATENT_SHAPE,
        in_channels=1,
        image_size=16,
        latent_channels=LATENT_SHAPE[0],
        downsample=4,
        recon_mse_train=0.0,
        measured_on=0,
    )
    vae_m = commit(store, "vae", {"seed": vae_seed}, [images], {"vae": vae}, vae_card.to_metrics())
    space = LatentSpace(
        latent_shape=LATENT_SHAPE,
        num_classes=ImagesCard.from_manifest(images).num_classes,
        latent_scale=1.0,
        vae_ref=vae_m.ref,
    )
    spec = dit_spec(GeneratorConfig(model="DiT-T/2"), space)

    def generator(stage: str, seed: int, inputs: list[Manifest], family: str, **extra) -> Manifest:
        net = random_generator(spec, seed)
        card = GeneratorCard(family=family, steps=0, **space.space_fields(), **extra)
        return commit(store, stage, {"seed": seed}, inputs, {"model": net, "raw": net}, card.to_metrics())

    base = generator("base", 1, [vae_m], "flow")
    reflow = generator("reflow", 2, [base], "flow", round=1, teacher_ref=base.ref, guidance=1.0)
    consistency = generator("consistency", 3, [reflow], "consistency", teacher_ref=reflow.ref, guidance=1.0)
    run = TinyRun(images, vae_m, base, reflow, consistency)
    return replace(run, ddpm=commit_diffusion(store, run)) if diffusion else run
