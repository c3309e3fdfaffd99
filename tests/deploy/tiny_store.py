"""A store holding a servable model without training one: a tiny VAE and an untrained DiT student,
committed through the store's own protocol and promoted to ``serving/current``.

Imported by the tests in this folder after ``sys.path.insert(0, <this folder>)``.
"""

from __future__ import annotations

import torch

from infra.cards import GeneratorCard, VAECard
from infra.store import SERVING_POINTER, Manifest, Store
from models.dit import DiT, dit_config
from models.registry import model_spec
from models.vae import VAE, VAEConfig

NUM_CLASSES = 3
LATENT = (2, 4, 4)  # (C, H, W): a 4x downsampling VAE decodes it to 16x16 grayscale
IMAGE_SHAPE = [16, 16, 1]


def commit_vae(store: Store) -> Manifest:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, latent_channels=LATENT[0], base_channels=4, downsample=4))
    with store.begin("vae", "tiny", config={"test": True}) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        card = VAECard(
            latent_scale=1.0,
            latent_shape=LATENT,
            in_channels=1,
            image_size=16,
            latent_channels=LATENT[0],
            downsample=4,
            recon_mse_train=0.0,
            measured_on=0,
        )
        return writer.commit(metrics=card.to_metrics())


def commit_generator(store: Store, stage: str, family: str, seed: int, vae: Manifest) -> Manifest:
    """An untrained DiT, its zero-initialised output layers nudged so that it depends on x, t and y."""
    torch.manual_seed(seed)
    net = DiT(dit_config("DiT-T/2", input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    with store.begin(stage, f"tiny{seed}", config={"seed": seed}, inputs=[vae]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family=family, steps=0, latent_shape=LATENT, num_classes=NUM_CLASSES, latent_scale=1.0, vae_ref=vae.ref
        )
        return writer.commit(metrics=card.to_metrics())


def promoted_store(uri: str) -> tuple[Store, Manifest, Manifest]:
    """(store, the promoted consistency student, a flow model that is not promoted)."""
    store = Store.open(uri)
    vae = commit_vae(store)
    student = commit_generator(store, "consistency", "consistency", 1, vae)
    flow = commit_generator(store, "base", "flow", 2, vae)
    store.put_pointer(SERVING_POINTER, student.ref)
    return store, student, flow
