"""Stage 10, evaluate: FID against NFE for every model of a run, on Ray.

(Over 350 lines: the cell plan, the Ray tasks and the assembly of the table are one stage; its outputs (report, quality ratios, scoring) already live in library modules.)

For each generator (base, each reflow round, consistency, ddpm), each of its samplers and step
counts, and each guidance scale of ``evaluate.guidance`` (for samplers that take classifier-free
guidance, on labelled data; :func:`cell_scales`) the stage draws ``n`` images, decodes them with the VAE and scores them in one
feature space (:mod:`workers.scoring`):

    FID              Fréchet distance to the real test split's features
    precision/recall k-NN manifolds (Kynkäänniemi et al., 2019) against the test split
    class accuracy   share of samples asked for class y that the classifier calls y
    seconds/image    wall time of sampling + decoding, per image, on one evaluation task
    straightness     S = int_0^1 E||(x_1 - x_0) - v_t||^2 dt of each ODE model's paths

One Ray task per cell (model, sampler, steps, guidance), at most ``resources.workers`` in flight, each
loading its generator and the scorer itself from the store. Two reference rows bound the
numbers: ``real-train`` (train images vs test: the floor, what a perfect sampler of the data
would score at this n) and ``vae-recon`` (the same train images encoded and decoded with the
VAE's mean: the best a generator of this VAE's latents can hope for).

Noise is fixed: image ``i`` of every cell comes from the seed ``(chunk seed, i)``, the chunk
seeds derived from ``evaluate.seed`` with a fixed chunk size, so the same config gives the
same numbers whatever the number of tasks, and every model is scored on the same x_0.

Outputs (written by :mod:`workers.report`): ``metrics`` (Parquet, :mod:`infra.metrics_table`),
``fid_vs_nfe.png``, ``grids/<model>-<sampler>-<steps>-g<guidance>.png`` (plus ``grids/real-test.png`` and
``grids/vae-recon.png``), ``straightness`` (JSON), ``report.md`` and an
:class:`~infra.cards.EvaluationCard`.
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
import torch

from infra.cards import FeaturesCard, GeneratorCard, ImagesCard, VAECard
from infra.config import ConfigError, EvaluateConfig
from infra.metrics_table import CEILING, FLOOR, REFERENCE, row_key
from infra.store import Manifest, StageWriter, Store
from models.metrics import class_accuracy, fid_draws, interval, kid_draws, precision_recall
from models.samplers import straightness
from models.sampling import network_passes
from workers import progress
from workers.generator import Generator, Request
from workers.quality import quality_ratios
from workers.references import GEN_CHUNK, ReferenceResult, chunk_seed, evaluate_references, requested_labels
from workers.report import Evaluation, grid_file, make_grid, write_evaluation
from workers.runner import run_stage
from workers.runtime import remote_options
from workers.scoring import ExtractorSource, Scored, Scorer, extractor_source

log = logging.getLogger("fewstep.evaluate")

STAGE = "evaluate"
STRAIGHTNESS_BATCH = 64


# --------------------------------------------------------------------------- what to evaluate


@dataclass(frozen=True)
class Cell:
    """One row of the table to compute: a generator at one sampler, step count and guidance scale."""

    model: str  # display name: base, reflow-1, consistency
    ref: str  # the generator's manifest ref
    sampler: str  # a name of models.sampling.SAMPLERS
    steps: int
    guidance: float
    with_straightness: bool = False

    @property
    def grid_name(self) -> str:
        return grid_file(self.model, self.sampler, self.steps, self.guidance)


def model_names(generators: Sequence[Manifest]) -> list[str]:
    """base, reflow-<round>, consistency; a key suffix where two generators would share a name."""
    names = []
    for m in generators:
        round_index = GeneratorCard.from_manifest(m).round
        names.append(f"{m.stage}-{round_index}" if round_index is not None else m.stage)
    return [f"{name}-{m.key[:8]}" if names.count(name) > 1 else name for name, m in zip(names, generators)]


def sampler_steps(config: EvaluateConfig) -> dict[str, tuple[int, ...]]:
    """The step counts each sampler is evaluated at (samplers left out are not evaluated)."""
    flow = tuple(sorted(set(config.flow_steps)))
    diffusion = tuple(sorted(set(config.diffusion_steps)))
    return {
        **{solver: flow for solver in config.flow_solvers},
        "consistency": tuple(sorted(set(config.consistency_steps))),
        **{sampler: diffusion for sampler in config.diffusion_samplers},
    }


def cell_scales(config: EvaluateConfig, card: GeneratorCard, guided: bool) -> tuple[float, ...]:
    """The guidance scales a model's sampler is scored at.

    Every scale of ``evaluate.guidance`` where the sampler takes classifier-free guidance and the
    data has labels (base, reflow rounds: flow models trained with label dropout; DDPM); the one
    scale built into a student that takes none (its card's, else 1); 1 on unlabelled data."""
    if not guided:
        return (card.guidance if card.guidance is not None else 1.0,)
    return config.guidance if card.num_classes > 0 else (1.0,)


def plan_cells(config: EvaluateConfig, generators: Sequence[Manifest]) -> list[Cell]:
    """Every (model, sampler, steps, guidance) to evaluate (:func:`cell_scales`); the straightness of
    each ODE model's paths once, with its first sampler at its largest step count and its first
    scale. Step counts beyond what a model's sampler takes (a diffusion model's T) are left out,
    with a warning."""
    from models.sampling import family_samplers

    plan, cells = sampler_steps(config), []
    for name, m in zip(model_names(generators), generators):
        card = GeneratorCard.from_manifest(m)
        path_measured = False
        for sampler in family_samplers(card.family, **card.sampler_params()):
            steps = plan.get(sampler.name, ())
            beyond = [s for s in steps if sampler.max_steps is not None and s > sampler.max_steps]
            if beyond:  # a diffusion model's T, a student's time grid
                log.warning(
                    "evaluate: %s takes at most %d steps with %s; leaving out %s",
                    name,
                    sampler.max_steps,
                    sampler.name,
                    beyond,
                )
                steps = tuple(s for s in steps if s not in beyond)
            scales = cell_scales(config, card, sampler.guided)
            for s in steps:
                for w in scales:
                    measure = sampler.has_path and not path_measured and s == steps[-1] and w == scales[0]
                    cells.append(Cell(name, m.ref, sampler.name, s, w, with_straightness=measure))
            path_measured = path_measured or (sampler.has_path and bool(steps))
    return cells


def evaluation_inputs(store: Store, generators: Sequence[Manifest]) -> tuple[Manifest, Manifest]:
    """(images, vae) behind a set of generators, read from their lineage. They must share one VAE."""
    if not generators:
        raise ValueError("no generators to evaluate; pass the manifests of base, reflow or consistency stages")
    not_generators = [m.ref for m in generators if not GeneratorCard.is_generator(m)]
    if not_generators:
        raise ValueError(f"{not_generators} are not generator models; pass refs of base, reflow or consistency stages")
    vae_refs = sorted({GeneratorCard.from_manifest(m).vae_ref for m in generators})
    if len(vae_refs) != 1:
        raise ValueError(
            f"the generators decode with different VAEs {vae_refs}; evaluate the models of one VAE at a time"
        )
    vae = store.get_ref(vae_refs[0])
    images = [ref for ref in vae.inputs if ref.split("/", 1)[0] == "ingest"]
    if len(images) != 1:
        raise ValueError(
            f"VAE {vae.ref} lists inputs {vae.inputs}, not one ingest stage; it was not made by the vae stage"
        )
    return store.get_ref(images[0]), vae


# --------------------------------------------------------------------------- Ray tasks


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
    passes = network_passes(generator.sampler(cell.sampler), cell.guidance)  # a guided step costs two
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


# --------------------------------------------------------------------------- metrics


def scored_row(
    model: str,
    stage_key: str,
    sampler: str,
    steps: int,
    nfe: int,
    guidance: float | None,
    extractor: str,
    real: Scored,
    fake: Scored,
    k: int,
    seconds: float | None,
) -> dict[str, Any]:
    """One table row: precision/recall of fake vs real features, and the classifier's verdict on the fake
    images (FID and KID, with their intervals, come from :func:`with_intervals`, over every row at once)."""
    real_f, fake_f = torch.tensor(real.features), torch.tensor(fake.features)  # copies: Ray hands read-only arrays
    pr = precision_recall(real_f, fake_f, k=k)
    accuracy = None
    if fake.logits is not None:
        keep = (fake.labels >= 0) & (fake.labels < fake.logits.shape[1])
        if keep.any():
            accuracy = class_accuracy(torch.tensor(fake.logits[keep]), torch.tensor(fake.labels[keep]))
    n = len(fake.features)
    return {
        "model": model,
        "stage_key": stage_key,
        "sampler": sampler,
        "steps": steps,
        "nfe": nfe,
        "guidance": guidance,
        "n": n,
        "extractor": extractor,
        "fid": None,
        "precision": pr.precision,
        "recall": pr.recall,
        "class_accuracy": accuracy,
        "seconds_per_image": None if seconds is None else seconds / n,
    }


def with_intervals(
    config: EvaluateConfig, reference: np.ndarray, rows: list[dict[str, Any]], features: dict[str, np.ndarray]
) -> dict[str, Any]:
    """FID and KID of every row against the reference (the real test split) with intervals, in one
    paired computation, and the quality ratios on excess over the floor; returns the FID draws.

    Every bootstrap draw resamples the same reference rows for every row, so the floor, a baseline
    and a candidate move together and their differences and ratios have honest intervals.
    """
    reference_t = torch.tensor(reference)
    named = {key: torch.tensor(f) for key, f in features.items()}
    fids = fid_draws(reference_t, named, resamples=config.fid_resamples, seed=config.seed)
    kids = kid_draws(
        reference_t, named, subsets=config.kid_subsets, subset_size=config.kid_subset_size, seed=config.seed
    )
    for row in rows:
        key = row_key(row)
        f, k = interval(fids[key], config.interval_level), interval(kids[key], config.interval_level)
        row.update(fid=f.value, fid_low=f.low, fid_high=f.high, kid=k.value, kid_low=k.low, kid_high=k.high)
    return fids


def check_sizes(config: EvaluateConfig, n_test: int, images_ref: str) -> None:
    if config.n <= config.knn_k:
        raise ConfigError(f"evaluate.n={config.n} must exceed evaluate.knn_k={config.knn_k} for precision and recall")
    if n_test <= config.knn_k:
        raise ConfigError(
            f"the images of {images_ref} have {n_test} test images; FID and precision/recall need more "
            f"than knn_k={config.knn_k}. Use more images or a larger ingest.test_fraction"
        )


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
        scored_row(FLOOR, images.ref, REFERENCE, 0, 0, None, name, reference.test, reference.train, k, None),
        scored_row(
            CEILING, vae.ref, REFERENCE, 0, 0, None, name, reference.test, reference.recon, k, reference.recon_seconds
        ),
    ]
    scored = {row_key(rows[0]): reference.train.features, row_key(rows[1]): reference.recon.features}
    grids = dict(reference.grids)
    paths: dict[str, dict[str, Any]] = {}
    for result in results[1:]:
        c = result.cell
        rows.append(
            scored_row(
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
        scored[row_key(rows[-1])] = result.scored.features
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
    draws = with_intervals(config, reference.test.features, rows, scored)
    ratios = quality_ratios(rows, draws, config.interval_level)
    return Evaluation(rows, grids, paths, info, ratios, {key: d.draws.tolist() for key, d in draws.items()})


# --------------------------------------------------------------------------- the stage


def run_evaluate(
    store: Store,
    config: EvaluateConfig,
    generators: Sequence[Manifest],
    images: Manifest,
    vae: Manifest,
    features: Manifest | None,
) -> Manifest:
    """Evaluate ``generators`` (stage ``evaluate``); returns its manifest (see the module docstring)."""
    generators = list(generators)
    found_images, found_vae = evaluation_inputs(store, generators)
    if (found_images.ref, found_vae.ref) != (images.ref, vae.ref):
        raise ValueError(
            f"the generators were trained on {found_images.ref} through {found_vae.ref}, "
            f"but evaluate got {images.ref} and {vae.ref}; pass the run's own images and vae"
        )
    VAECard.from_manifest(vae)
    check_sizes(config, ImagesCard.from_manifest(images).n_test, images.ref)
    source = extractor_source(config, features)
    inputs = [images, vae, *([features] if features is not None else []), *generators]
    # The key: what changes the numbers (not where they run); a user extractor by its digest.
    section = {**config.keyed(), "extractor_sha256": source.sha256}

    def build(writer: StageWriter, key: str):
        return write_evaluation(writer, compute_evaluation(store, config, generators, images, vae, features, source))

    return run_stage(store, STAGE, section, inputs, build, source=__name__)
