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
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from infra.cards import ImagesCard, LatentsCard, VAECard
from infra.config import LatentsConfig
from infra.store import Manifest, StageWriter, Store, split_ref
from infra.tables import tensors_to_table, with_metadata
from infra.version import code_version
from models.registry import build_model
from workers import progress
from workers.data import preserved_order, verified_paths
from workers.incremental import Carried, carry_parts, part_names, previous_output, read_folder, read_part
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


def drop_ids(batch: pa.Table, ids: pa.Array) -> pa.Table:
    """Ray Data UDF: the rows whose id is not in ``ids`` (rows carried over, not encoded again)."""
    return batch.filter(pc.invert(pc.is_in(batch["id"], value_set=ids)))


def encoded_dataset(
    store: Store,
    images: Manifest,
    spec: dict,
    state: Any,
    channels: int,
    config: LatentsConfig,
    n_images: int,
    skip: pa.Array | None = None,
):
    """images table -> rows {id, split, label, mean, logvar}, encoded by an actor pool.

    ``skip``: ids not to encode (an incremental run); an images part with no other row is not read."""
    import ray.data

    resources = config.resources
    device = "cuda" if resources.gpus > 0 else "cpu"
    if skip is None:
        paths = verified_paths(store, images, "images")
    else:
        paths = []
        for name in part_names(images, "index"):
            ids = read_part(store, images, f"index/{name}", ["id"]).column("id")
            if not pc.all(pc.is_in(ids, value_set=skip)).as_py():
                paths += store.verified_paths(images, f"images/{name}")
    ds = ray.data.read_parquet(paths, filesystem=store.pa_filesystem)
    ds = ds.select_columns(["id", "split", "label", "image"])
    if skip is not None:
        ds = ds.map_batches(drop_ids, batch_format="pyarrow", batch_size=None, fn_kwargs={"ids": skip})
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


def write_streaming(
    writer: StageWriter,
    ds,
    metadata: Mapping[str, str],
    total: int,
    name: str = "latents",
    part: str = "part-00000.parquet",
) -> Written:
    """Stream the dataset's batches into ``name/part`` under the writer's staging prefix (memory
    stays at one batch), then add it to the writer's files."""
    path = f"{writer.prefix}/{name}/{part}"
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


@dataclass(frozen=True)
class Plan:
    """The previous latents this run builds on, and the image ids whose rows it carries over."""

    previous: Manifest | None = None
    keep: pa.Array | None = None


def plan_latents(store: Store, config: LatentsConfig, images: Manifest, vae: Manifest) -> Plan:
    """The newest earlier latents of the same VAE, settings and code (:mod:`workers.incremental`),
    and the ids whose image row (split, label, PNG digest) is the same in its images and in ours."""
    previous = previous_output(store, STAGE, config.keyed(), code_version(__name__), inputs=(vae.ref,))
    if previous is None:
        return Plan()
    earlier = next((ref for ref in previous.inputs if ref.startswith("ingest/")), None)
    old_images = store.get(*split_ref(earlier)) if earlier else None
    columns = ["id", "split", "label", "digest"]
    if old_images is None or not part_names(old_images, "index") or not part_names(images, "index"):
        return Plan()  # its images are gone (gc) or predate the index: encode everything
    new = read_folder(store, images, "index", columns)
    old = read_folder(store, old_images, "index", columns)
    both = new.join(old, "id", join_type="inner", right_suffix="_old")
    same = pc.and_(
        pc.and_(pc.equal(both["split"], both["split_old"]), pc.equal(both["label"], both["label_old"])),
        pc.equal(both["digest"], both["digest_old"]),
    )
    return Plan(previous, both.filter(same).column("id").combine_chunks())


def run_latents(store: Store, config: LatentsConfig, images: Manifest, vae: Manifest) -> Manifest:
    """Encode every image of ``images`` with the VAE of ``vae``; returns the latents manifest.

    Rows of the newest earlier latents of the same VAE (:func:`plan_latents`) whose image is
    unchanged are carried over; only the other images are encoded."""
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
        plan = plan_latents(store, config, images, vae)
        carried = Carried(0, 0, 0, 0)
        splits: dict[str, int] = {}
        part = "part-00000.parquet"
        if plan.previous is not None:
            carried = carry_parts(writer, plan.previous, ("latents",), plan.keep)
            index = read_folder(store, images, "index", ["id", "split"])
            kept = index.filter(pc.is_in(index["id"], value_set=plan.keep))
            splits = dict(Counter(kept["split"].to_pylist()))
            todo = index.filter(pc.invert(pc.is_in(index["id"], value_set=plan.keep)))["id"]
            part = f"part-{pc.min(todo).as_py()}.parquet" if len(todo) else ""
            log.info(
                "latents: carrying %d row(s) over from %s, encoding %d", carried.rows, plan.previous.ref, len(todo)
            )
        n_todo = images_card.n_images - carried.rows
        written = Written(0, {}, LatentsCard.from_manifest(plan.previous).latent_shape if plan.previous else ())
        if n_todo > 0:
            with preserved_order():
                ds = encoded_dataset(store, images, spec, state, images_card.channels, config, n_todo, skip=plan.keep)
                written = write_streaming(writer, ds, metadata, n_todo, part=part)
        for split, count in written.splits.items():
            splits[split] = splits.get(split, 0) + count
        return LatentsCard(
            n_latents=written.rows + carried.rows,
            n_train=splits.get("train", 0),
            n_test=splits.get("test", 0),
            latent_shape=written.shape,
            latent_scale=vae_card.latent_scale,
            num_classes=images_card.num_classes,
            vae_ref=vae.ref,
            dtype=DTYPE,
            encoder_nodes=written.nodes,
            draw=config.draw,
            encoded=written.rows,
            reused=carried.rows,
            previous_ref=plan.previous.ref if plan.previous is not None else None,
        )

    return run_stage(store, STAGE, config, [images, vae], build, source=__name__)
