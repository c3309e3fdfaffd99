"""Stage 3, latents: every image through the VAE encoder, once, into the ``latents`` table.

A Ray Data actor pool (``latents.resources``: ``workers`` actors, each with ``cpus`` /
``gpus``) runs :class:`LatentEncoder`, which builds the VAE once per actor and
maps batches of stored PNGs to the posterior q(z | x) = N(mean, exp(logvar)). The table keeps
both moments (unscaled), so the training stages can draw z = mean + exp(logvar / 2) * eps
afresh every epoch and multiply by the latent scale themselves.

The latent scale is the VAE stage's measurement (its :class:`~infra.cards.VAECard`); this stage
copies it into its own card and into the Parquet schema metadata next to the VAE's ref
and digest, the dtype and the shape, so a table read without fewstep says what it holds.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from infra.cards import ImagesCard, LatentsCard, VAECard
from infra.config import LatentsConfig
from infra.store import Manifest, StageWriter, Store
from infra.tables import tensors_to_table, with_metadata
from models.registry import build_model
from workers import progress
from workers.data import preserved_order, verified_paths
from workers.pixels import decode_batch
from workers.runner import run_stage
from workers.runtime import current_node, remote_options, threads_for, use_threads, worker_env
from workers.vae_kinds import load_vae

log = logging.getLogger("fewstep.latents")

STAGE = "latents"
DTYPE = "float32"
BLOCK_ROWS = 8192  # rows per block the encoder pool gets and the driver writes at once


class LatentEncoder:
    """Ray Data class UDF: a batch of image rows -> the same rows with ``mean`` and ``logvar``.

    A plain callable: ``LatentEncoder(spec, state, channels)(batch)`` works without Ray. Under
    Ray, ``state`` may be an ``ObjectRef`` to the state dict, fetched once per actor.

    batch:  {"id", "split", "label", "image": PNG bytes}  (numpy arrays of length N)
    return: {"id", "split", "label", "mean": (N, c, h, w) float32, "logvar": (N, c, h, w) float32}
    """

    def __init__(self, spec: dict, state: Any, channels: int, device: str = "cpu", threads: int | None = None):
        use_threads(threads)
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(
                f"the latents actor was asked for device {device!r} but sees no CUDA device; "
                "set 'latents.gpus_per_actor: 0' or run on a node with a GPU"
            )
        if not isinstance(state, Mapping):
            import ray

            state = ray.get(state)
        self.device = torch.device(device)
        self.channels = channels
        self.vae = build_model(spec)
        self.vae.load_state_dict(state)
        self.vae.eval().requires_grad_(False).to(self.device)
        self.node = current_node()

    @torch.inference_mode()
    def __call__(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(decode_batch(batch["image"], self.channels)).to(self.device)  # (N, C, H, W)
        posterior = self.vae.encode(x)  # mean, logvar: (N, c, h, w)
        return {
            "id": np.asarray(batch["id"]),
            "split": np.asarray(batch["split"]),
            "label": np.asarray(batch["label"], dtype=np.int64),
            "mean": posterior.mean.float().cpu().numpy(),
            "logvar": posterior.logvar.float().cpu().numpy(),
            "node": np.full(len(batch["id"]), self.node),  # which Ray node encoded it; not stored
        }


def vae_state(store: Store, vae: Manifest, name: str = "vae") -> tuple[dict, dict[str, Tensor]]:
    """(spec, CPU state dict) of the VAE a vae manifest holds, read and verified once on the driver."""
    spec = store.read_json(vae, f"{name}.json")
    module = load_vae(store, vae, name)
    return spec, {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def encoded_dataset(
    store: Store, images: Manifest, spec: dict, state: Any, channels: int, config: LatentsConfig, n_images: int
):
    """images table -> rows {id, split, label, mean, logvar}, encoded by an actor pool."""
    import ray.data

    resources = config.resources
    device = "cuda" if resources.gpus > 0 else "cpu"
    ds = ray.data.read_parquet(verified_paths(store, images, "images"), filesystem=store.pa_filesystem)
    ds = ds.select_columns(["id", "split", "label", "image"])
    # One Parquet file reads as one block, and a block goes to one actor: split it so every
    # actor of the pool (on every node) gets work, in blocks of at most BLOCK_ROWS rows so the
    # driver, which writes the blocks as they come, holds a bounded amount whatever the
    # dataset's size. Order is kept (no shuffle).
    blocks = max(4 * resources.workers, -(-n_images // BLOCK_ROWS))
    ds = ds.repartition(blocks)
    threads = threads_for(resources.cpus, resources.workers, data_cores=0)
    return ds.map_batches(
        LatentEncoder,
        fn_constructor_kwargs={
            "spec": spec,
            "state": state,
            "channels": channels,
            "device": device,
            "threads": threads,
        },
        batch_size=config.batch_size,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=resources.workers),
        **remote_options(resources),
        runtime_env={"env_vars": worker_env(threads)},
    )


@dataclass(frozen=True)
class Written:
    rows: int
    splits: dict[str, int]
    shape: tuple[int, ...]  # (c, h, w) of one latent
    nodes: tuple[str, ...] = ()  # the Ray nodes whose actors encoded the rows


def write_streaming(writer: StageWriter, ds, metadata: Mapping[str, str], total: int, name: str = "latents") -> Written:
    """Stream the dataset's batches into ``name/part-00000.parquet`` under the writer's staging
    prefix (memory stays at one batch), then add it to the writer's files."""
    path = f"{writer.prefix}/{name}/part-00000.parquet"
    store = writer.store
    store.fs.makedirs(f"{writer.prefix}/{name}", exist_ok=True)
    out: pq.ParquetWriter | None = None
    rows, splits, shape, nodes = 0, {}, (), set()
    try:
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            if len(batch["id"]) == 0:
                continue
            batch = dict(batch)
            nodes.update(str(node) for node in np.unique(batch.pop("node", np.array(["local"]))))
            table = tensors_to_table(batch)
            if out is None:
                shape = tuple(int(d) for d in batch["mean"].shape[1:])
                produced = {
                    "fewstep.ref": writer.ref,
                    "fewstep.code_version": writer.code_version,
                    "fewstep.shape": json.dumps(list(shape)),
                }
                schema = with_metadata(table, {**produced, **dict(metadata)}).schema
                out = pq.ParquetWriter(path, schema, filesystem=store.pa_filesystem)
            out.write_table(table.replace_schema_metadata(schema.metadata))
            rows += table.num_rows
            progress.advance(STAGE, rows, total)
            for split, count in zip(*np.unique(batch["split"].astype(str), return_counts=True)):
                splits[str(split)] = splits.get(str(split), 0) + int(count)
    finally:
        if out is not None:
            out.close()
    if out is None:
        raise ValueError("the images table holds no images to encode")
    writer.add_files([name])
    return Written(rows, splits, shape, tuple(sorted(nodes)))


def run_latents(store: Store, config: LatentsConfig, images: Manifest, vae: Manifest) -> Manifest:
    """Encode every image of ``images`` with the VAE of ``vae``; returns the latents manifest."""
    vae_card, images_card = VAECard.from_manifest(vae), ImagesCard.from_manifest(images)

    def build(writer: StageWriter, key: str) -> LatentsCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        spec, state = vae_state(store, vae)
        metadata = {
            "fewstep.vae_ref": vae.ref,
            "fewstep.vae_digest": vae.digest,
            "fewstep.images_ref": images.ref,
            "fewstep.latent_scale": repr(vae_card.latent_scale),
            "fewstep.dtype": DTYPE,
            "fewstep.moments": "mean, logvar of q(z|x); generators train on latent_scale * mean "
            "(or * (mean + exp(logvar/2) * eps) with draw: sample)",
            "fewstep.draw": config.draw,
        }
        with preserved_order():
            ds = encoded_dataset(store, images, spec, state, images_card.channels, config, images_card.n_images)
            written = write_streaming(writer, ds, metadata, images_card.n_images)
        return LatentsCard(
            n_latents=written.rows,
            n_train=written.splits.get("train", 0),
            n_test=written.splits.get("test", 0),
            latent_shape=written.shape,
            latent_scale=vae_card.latent_scale,
            num_classes=images_card.num_classes,
            vae_ref=vae.ref,
            dtype=DTYPE,
            encoder_nodes=written.nodes,
            draw=config.draw,
        )

    return run_stage(store, STAGE, config, [images, vae], build, source=__name__)
