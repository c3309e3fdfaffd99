"""The evaluation's Ray tasks: each draws one cell's images, decodes and scores them; the driver assembles the table.

One Ray task per cell (model, sampler, steps, guidance; :mod:`workers.evaluation.plan`), at most
``resources.workers`` in flight, each loading its generator and the scorer itself from the store,
plus one task for the two reference rows (:mod:`workers.evaluation.references`): ``real-train``
(the floor, what a perfect sampler of the data would score at this n) and ``vae-recon`` (the
best a generator of this VAE's latents can hope for).

Noise is fixed: image ``i`` of every cell comes from the seed ``(chunk seed, i)``, the chunk
seeds derived from ``evaluate.seed`` with a fixed chunk size, so the same config gives the
same numbers whatever the number of tasks, and every model is scored on the same x_0.

    straightness     S = int_0^1 E||(x_1 - x_0) - v_t||^2 dt of each ODE model's paths
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import ray

from infra.cards import FeaturesCard
from infra.config import EvaluateConfig
from infra.store import Manifest, Store
from models.samplers import straightness
from workers import progress
from workers.evaluation.grids import make_grid
from workers.evaluation.measure import measured_row, with_intervals
from workers.evaluation.outputs import Evaluation
from workers.evaluation.plan import Cell, check_sizes, plan_cells
from workers.evaluation.quality import quality_ratios
from workers.evaluation.references import (
    GEN_CHUNK,
    ReferenceResult,
    chunk_seed,
    evaluate_references,
    requested_labels,
)
from workers.evaluation.scoring import ExtractorSource, Scored, Scorer, extractor_source
from workers.evaluation.table import CEILING, FLOOR, REFERENCE
from workers.generator import Generator, Request
from workers.runtime import remote_options

log = logging.getLogger("fewstep.evaluate")

STAGE = "evaluate"  # the progress view's name for it
STRAIGHTNESS_BATCH = 64


@dataclass(frozen=True)
class CellResult:
    cell: Cell
    scored: Scored
    nfe: int
    seconds: float
    grid: bytes
    straightness: float | None


def cell_request(generator: Generator, cell: Cell, labels: np.ndarray, seed: int) -> Request:
    asked = tuple(int(y) for y in labels) if generator.num_classes else None
    return Request(
        n=len(labels), steps=cell.steps, sampler=cell.sampler, labels=asked, guidance=cell.guidance, seed=seed
    )


def evaluate_cell(
    store: Store, cell: Cell, n: int, seed: int, source: ExtractorSource, features_ref: str | None, device: str = "cpu"
) -> CellResult:
    """Draw ``n`` images of one cell, decode, score; the straightness on a small batch if asked."""
    generator = Generator.load(store, store.get_ref(cell.ref), device)
    labels = requested_labels(n, generator.num_classes)
    generator.generate(cell_request(generator, cell, labels[:1], seed))  # warm-up (lazy init, allocator), not timed
    parts, seconds, nfe = [], 0.0, 0
    passes = generator.network_passes(cell.sampler, cell.guidance)  # a guided step costs two, unless distilled
    for index, start in enumerate(range(0, n, GEN_CHUNK)):
        chunk = cell_request(generator, cell, labels[start : start + GEN_CHUNK], chunk_seed(seed, index))
        started = time.perf_counter()
        images = generator.generate(chunk)
        seconds += time.perf_counter() - started
        parts.append(images.pixels)
        nfe = images.nfe * passes
    pixels = np.concatenate(parts)  # (n, H, W, C)
    scorer = Scorer.load(store, source, features_ref, device)
    path_straightness = measure_straightness(generator, cell, seed) if cell.with_straightness else None
    grid = make_grid(pixels, labels, generator.num_classes)
    return CellResult(cell, scorer.score(pixels, labels), nfe, seconds, grid, path_straightness)


def measure_straightness(generator: Generator, cell: Cell, seed: int) -> float:
    """S of the sampler's own path (in the model's scaled latent space) on a small fixed batch."""
    labels = requested_labels(STRAIGHTNESS_BATCH, generator.num_classes)
    request = cell_request(generator, cell, labels, chunk_seed(seed, 0))
    noise = generator.noise_for(request).to(generator.device)
    y = generator.labels_for(request).to(generator.device)
    out = generator.sampler(cell.sampler).sample(
        generator.net, list(noise), y, cell.steps, cell.guidance, return_path=True
    )
    return float(straightness(out.path, out.times))


_cell_task = ray.remote(evaluate_cell)
_reference_task = ray.remote(evaluate_references)


def run_bounded(
    submit: Sequence[Callable[[], ray.ObjectRef]], limit: int, on_done: Callable[[int, Any], None] = lambda i, r: None
) -> list[Any]:
    """Run the submitted tasks with at most ``limit`` in flight; results in submission order."""
    results: list[Any] = [None] * len(submit)
    pending: dict[Any, int] = {}
    next_index = 0
    while next_index < len(submit) or pending:
        while next_index < len(submit) and len(pending) < limit:
            pending[submit[next_index]()] = next_index
            next_index += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            index = pending.pop(ref)
            results[index] = ray.get(ref)
            on_done(index, results[index])
    return results


def compute_evaluation(
    store: Store,
    config: EvaluateConfig,
    generators: Sequence[Manifest],
    images: Manifest,
    vae: Manifest,
    features: Manifest | None,
    source: ExtractorSource | None = None,
) -> Evaluation:
    """Run every cell and the reference task on Ray; return the rows, grids and straightness."""
    from workers.runtime import ensure_ray

    ensure_ray()
    source = source or extractor_source(config, features)
    if source.data is not None and not isinstance(source.data, ray.ObjectRef):
        source = replace(source, data=ray.put(source.data))  # one copy in the object store, not one per task
    features_ref = features.ref if features is not None else None
    resources = config.resources
    device = "cuda" if resources.gpus > 0 else "cpu"
    options = remote_options(resources)
    cells = plan_cells(config, generators)
    submit: list[Callable[[], Any]] = [
        lambda: _reference_task.options(**options).remote(
            store, images.ref, vae.ref, config.n, source, features_ref, device
        )
    ]
    submit += [
        (
            lambda c=c: _cell_task.options(**options).remote(
                store, c, config.n, config.seed, source, features_ref, device
            )
        )
        for c in cells
    ]
    finished = [0]

    def on_done(index: int, result: Any) -> None:
        finished[0] += 1
        note = ""
        if isinstance(result, CellResult):
            c = result.cell
            note = f"{c.model} {c.sampler}@{c.steps} w={c.guidance:g}"
            log.info("evaluate: %s sampled in %.1fs (%d/%d tasks done)", note, result.seconds, finished[0], len(submit))
        progress.advance(STAGE, finished[0], len(submit), note)

    results = run_bounded(submit, resources.workers, on_done)
    reference: ReferenceResult = results[0]
    check_sizes(config, len(reference.test.features), images.ref)
    k, name = config.knn_k, source.name
    rows = [
        measured_row(FLOOR, images.ref, REFERENCE, 0, 0, None, name, reference.test, reference.train, k, None),
        measured_row(
            CEILING, vae.ref, REFERENCE, 0, 0, None, name, reference.test, reference.recon, k, reference.recon_seconds
        ),
    ]
    scored = {rows[0].key: reference.train.features, rows[1].key: reference.recon.features}
    grids = dict(reference.grids)
    paths: dict[str, dict[str, Any]] = {}
    for result in results[1:]:
        c = result.cell
        rows.append(
            measured_row(
                c.model,
                c.ref,
                c.sampler,
                c.steps,
                result.nfe,
                c.guidance,
                name,
                reference.test,
                result.scored,
                k,
                result.seconds,
            )
        )
        scored[rows[-1].key] = result.scored.features
        grids[c.grid_name] = result.grid
        if result.straightness is not None:  # a diverged path (inf/NaN) is recorded as None
            value = result.straightness if math.isfinite(result.straightness) else None
            paths[c.model] = {
                "value": value,
                "sampler": c.sampler,
                "steps": c.steps,
                "guidance": c.guidance,
                "paths": STRAIGHTNESS_BATCH,
                "ref": c.ref,
            }
    space = FeaturesCard.from_manifest(features) if features is not None else None
    info = {
        "extractor": name,
        "n": config.n,
        "seed": config.seed,
        "knn_k": k,
        "n_test": len(reference.test.features),
        "images_ref": images.ref,
        "vae_ref": vae.ref,
        "features_ref": features_ref,
        "features_test_accuracy": space.test_accuracy if space is not None else None,
        "models": {c.model: c.ref for c in cells},
        "fid_resamples": config.fid_resamples,
        "interval_level": config.interval_level,
    }
    rows, draws = with_intervals(config, reference.test.features, rows, scored)
    ratios = quality_ratios(rows, draws, config.interval_level)
    return Evaluation(rows, grids, paths, info, ratios, {key: d.draws.tolist() for key, d in draws.items()})
