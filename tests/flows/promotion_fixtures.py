"""Stored stand-ins for the promotion tests: a consistency "generator" (a card, no weights) and an
evaluation that scores several of them on the same images and seeds, with their paired draws."""

from __future__ import annotations

import pyarrow as pa

from infra.cards import GeneratorCard
from infra.store import Manifest, Store
from workers.evaluation.table import COLUMNS, DRAWS


def commit_generator(store: Store, key: str) -> Manifest:
    with store.begin("consistency", key, config={"key": key}) as writer:
        writer.write_json("note", {"what": "a promotion test model"})
        card = GeneratorCard(
            family="consistency", steps=0, latent_shape=(2, 4, 4), num_classes=0, latent_scale=1.0, vae_ref="vae/v"
        )
        return writer.commit(metrics=card.to_metrics())


def commit_evaluation(store: Store, key: str, scored: list, steps: int = 1) -> Manifest:
    """One evaluation of several models at ``steps`` consistency steps: ``scored`` holds
    (manifest, FID, paired draws) per model; the FID interval is FID +- 0.5."""
    rows, draws = [], []
    for manifest, fid, model_draws in scored:
        values = dict.fromkeys(COLUMNS)
        values.update(
            model=f"consistency-{manifest.key}",
            stage_key=manifest.ref,
            sampler="consistency",
            steps=steps,
            nfe=steps,
            n=100,
            extractor="test",
            fid=fid,
            fid_low=fid - 0.5,
            fid_high=fid + 0.5,
        )
        rows.append(values)
        draws.append({"row": f"consistency-{manifest.key}|consistency|{steps}", "draws": model_draws})
    with store.begin("evaluate", key, config={"key": key}, inputs=[m for m, _, _ in scored]) as writer:
        writer.write_table("metrics", pa.Table.from_pylist(rows))
        writer.write_table(DRAWS, pa.Table.from_pylist(draws))
        return writer.commit(metrics={"rows": len(rows)})
