"""Stage 12, probe: a cheap check after each generator stage that the model has learned the data.

Run by the flow right after base, each reflow round, consistency and ddpm (before the full
evaluation), it draws ``probe.n`` images per guidance scale with the model's own sampler and
scores them in the evaluation's feature space (:mod:`workers.evaluation.scoring`), beside the
evaluation's references at the same n (:mod:`workers.evaluation.references`):

    FID            against the real test split, with a bootstrap interval (paired draws) and the
                   bias-corrected FID it is built around
    class accuracy share of samples asked for class y that the classifier calls y, with an interval
    floor          real train images against the test split (FID, and the classifier's accuracy)
    ceiling        their VAE reconstructions (the best a generator of these latents can do)

Scales: ``probe.guidance`` for a model that takes classifier-free guidance on labelled data;
one scale for unlabelled data (1.0) and for a distilled student, whose sampler takes no
guidance (its card's). Steps: ``probe.steps`` for flow (Euler, the family's first sampler) and
diffusion models, ``probe.student_steps`` for a student; never beyond what its sampler takes.

Each scale is measured as a :class:`~workers.evaluation.table.Row`, ranked like the evaluation's.
The verdict (:func:`workers.evaluation.quality.learned_verdict`) reads the best scale (lowest FID): it warns
when class accuracy < ``min_accuracy_over_chance`` x chance, or the FID's excess over the floor
> ``max_excess_over_ceiling`` x the ceiling's, and names the figures and the likely fix.

One Ray task draws and scores (``probe.resources``); the card (:class:`~infra.cards.ProbeCard`)
holds every figure, and ``grids/guidance-<g>.png`` the samples at each scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray
import torch

from infra.cards import GeneratorCard, ProbeCard, VAECard
from infra.config import ConfigError, EvaluateConfig, ProbeConfig
from infra.store import Manifest, StageWriter, Store
from models.metrics import accuracy_draws, fid_draws, interval
from models.sampling import Sampler, family_samplers
from workers.evaluation.grids import make_grid
from workers.evaluation.quality import Figures, learned_verdict
from workers.evaluation.references import GEN_CHUNK, chunk_seed, evaluate_references, requested_labels
from workers.evaluation.scoring import ExtractorSource, Scored, Scorer, extractor_source
from workers.evaluation.table import CEILING, FLOOR, REFERENCE, Row, best_row
from workers.generator import Generator, Request
from workers.runner import run_stage
from workers.runtime import remote_options

STAGE = "probe"


@dataclass(frozen=True)
class Plan:
    sampler: Sampler
    steps: int
    scales: tuple[float, ...]


def probe_plan(card: GeneratorCard, config: ProbeConfig) -> Plan:
    """The sampler (the family's first), the step count and the guidance scales a model is probed at."""
    sampler = family_samplers(card.family, **card.sampler_params())[0]
    steps = config.steps if sampler.guided else config.student_steps  # unguided: a distilled few-step student
    if sampler.max_steps is not None:
        steps = min(steps, sampler.max_steps)
    if not sampler.guided:
        scales = (card.guidance if card.guidance is not None else 1.0,)
    elif card.num_classes == 0:
        scales = (1.0,)
    else:
        scales = config.guidance
    return Plan(sampler, steps, tuple(scales))


@dataclass(frozen=True)
class Drawn:
    pixels: np.ndarray  # uint8 (n, H, W, C)
    nfe: int  # network passes per image (a guided step costs two)


def draw(generator: Generator, sampler: str, steps: int, guidance: float, labels: np.ndarray, seed: int) -> Drawn:
    """Images, image i from the seed (chunk seed, i) as the evaluation draws them."""
    parts, nfe = [], 0
    for index, start in enumerate(range(0, len(labels), GEN_CHUNK)):
        chunk = labels[start : start + GEN_CHUNK]
        asked = tuple(int(y) for y in chunk) if generator.num_classes else None
        request = Request(
            n=len(chunk), steps=steps, sampler=sampler, labels=asked, guidance=guidance, seed=chunk_seed(seed, index)
        )
        images = generator.generate(request)
        parts.append(images.pixels)
        nfe = images.nfe * generator.network_passes(sampler, guidance)
    return Drawn(np.concatenate(parts), nfe)


def accuracy_of(scored: Scored, config: ProbeConfig, stream: int) -> tuple[float | None, float | None, float | None]:
    """(class accuracy, low, high) of the images' asked-for labels; Nones without a classifier or labels."""
    if scored.logits is None:
        return None, None, None
    keep = (scored.labels >= 0) & (scored.labels < scored.logits.shape[1])
    if not keep.any():
        return None, None, None
    correct = torch.from_numpy(scored.logits[keep].argmax(1) == scored.labels[keep])
    found = interval(accuracy_draws(correct, config.fid_resamples, config.seed + stream), config.interval_level)
    return found.value, max(0.0, found.low), min(1.0, found.high)


@dataclass(frozen=True)
class Probed:
    card: ProbeCard
    grids: dict[str, bytes]


def probe_model(
    store: Store,
    config: ProbeConfig,
    model_ref: str,
    images_ref: str,
    vae_ref: str,
    source: ExtractorSource,
    features_ref: str | None,
    device: str = "cpu",
) -> Probed:
    """Draw, score and judge one generator (the body of the stage's one Ray task)."""
    torch.manual_seed(config.seed)
    manifest = store.get_ref(model_ref)
    generator = Generator.load(store, manifest, device)
    plan = probe_plan(generator.card, config)
    reference = evaluate_references(store, images_ref, vae_ref, config.n, source, features_ref, device)
    scorer = Scorer.load(store, source, features_ref, device)
    labels = requested_labels(config.n, generator.num_classes)
    features = {"floor": reference.train.features, "ceiling": reference.recon.features}
    scored, nfe, grids = {}, {}, {}
    for g in plan.scales:
        drawn = draw(generator, plan.sampler.name, plan.steps, g, labels, config.seed)
        scored[g], nfe[g] = scorer.score(drawn.pixels, labels), drawn.nfe
        features[f"guidance={g:g}"] = scored[g].features
        grids[f"grids/guidance-{g:g}.png"] = make_grid(drawn.pixels, labels, generator.num_classes)
    draws = fid_draws(
        torch.from_numpy(reference.test.features),
        {name: torch.from_numpy(f) for name, f in features.items()},
        resamples=config.fid_resamples,
        seed=config.seed,
    )
    floor_accuracy = accuracy_of(reference.train, config, -1)[0]
    ceiling_accuracy = accuracy_of(reference.recon, config, -2)[0]
    common = dict(n=config.n, extractor=source.name)
    rows = [
        Row(FLOOR, images_ref, REFERENCE, 0, 0, fid=draws["floor"].value, class_accuracy=floor_accuracy, **common),
        Row(CEILING, vae_ref, REFERENCE, 0, 0, fid=draws["ceiling"].value, class_accuracy=ceiling_accuracy, **common),
    ]
    scales = []
    for stream, g in enumerate(plan.scales):
        fid = interval(draws[f"guidance={g:g}"], config.interval_level)
        accuracy, low, high = accuracy_of(scored[g], config, stream)
        rows.append(
            Row(
                manifest.stage,
                model_ref,
                plan.sampler.name,
                plan.steps,
                nfe[g],
                float(g),
                fid=fid.value,
                fid_low=fid.low,
                fid_high=fid.high,
                fid_corrected=fid.corrected,
                class_accuracy=accuracy,
                **common,
            )
        )
        scales.append(
            {
                "guidance": float(g),
                "fid": fid.value,
                "fid_low": fid.low,
                "fid_high": fid.high,
                "fid_corrected": fid.corrected,
                "class_accuracy": accuracy,
                "accuracy_low": low,
                "accuracy_high": high,
            }
        )
    best = best_row(rows) or rows[2]  # a model whose every scale diverged is judged at its first
    num_classes = generator.num_classes
    chance = 1.0 / num_classes if num_classes > 0 else None
    figures = Figures.of(best, rows, chance)
    at = f"at its best guidance {best.guidance:g}" if len(scales) > 1 else f"at {plan.steps} step(s)"
    verdict = learned_verdict(
        model_ref, figures, config.min_accuracy_over_chance, config.max_excess_over_ceiling, at=at
    )
    card = ProbeCard(
        model_ref=model_ref,
        model_stage=manifest.stage,
        sampler=plan.sampler.name,
        steps=plan.steps,
        n=config.n,
        extractor=source.name,
        scales=tuple(scales),
        best_guidance=best.guidance,
        verdict=verdict,
        chance=chance,
        floor_fid=draws["floor"].value,
        ceiling_fid=draws["ceiling"].value,
        floor_accuracy=floor_accuracy,
        ceiling_accuracy=ceiling_accuracy,
    )
    return Probed(card, grids)


_probe_task = ray.remote(probe_model)


def run_probe(
    store: Store,
    config: ProbeConfig,
    generator: Manifest,
    images: Manifest,
    vae: Manifest,
    features: Manifest | None,
    extractor: str | None = None,
    extractor_kind: str = "torchscript",
) -> Manifest:
    """Probe ``generator`` (stage ``probe``, keyed by the generator, the images, the VAE, the feature
    space and this section); returns the probe's manifest. ``extractor`` / ``extractor_kind``: the
    evaluation's user extractor, used when there is no features stage (then FID only)."""
    if not GeneratorCard.is_generator(generator):
        raise ValueError(
            f"{generator.ref} is a {generator.stage!r} output, not a generator; probe a base, reflow, "
            "consistency or ddpm ref"
        )
    card = GeneratorCard.from_manifest(generator)
    VAECard.from_manifest(vae)
    if card.vae_ref != vae.ref:
        raise ValueError(f"{generator.ref} decodes with {card.vae_ref}, not {vae.ref}; pass the run's own vae")
    if features is None and extractor is None:
        raise ConfigError(
            "the probe needs a feature space: pass the features stage's manifest, or set "
            "evaluate.extractor to a local TorchScript or Inception-v3 file"
        )
    source = extractor_source(EvaluateConfig(extractor=extractor, extractor_kind=extractor_kind), features)
    inputs = [generator, images, vae, *([features] if features is not None else [])]
    section = {**config.keyed(), "extractor_sha256": source.sha256}

    def build(writer: StageWriter, key: str) -> ProbeCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        device = "cuda" if config.resources.gpus > 0 else "cpu"
        task = _probe_task.options(**remote_options(config.resources))
        probed: Probed = ray.get(
            task.remote(
                store,
                config,
                generator.ref,
                images.ref,
                vae.ref,
                source,
                features.ref if features is not None else None,
                device,
            )
        )
        for name, png in probed.grids.items():
            writer.write_bytes(name, png)
        return probed.card

    return run_stage(store, STAGE, section, inputs, build, source=__name__)


def probe_best_guidance(store: Store, probe_ref: str) -> float:
    """The guidance scale at which the probed model scored its lowest FID (for defaulting the
    reflow pairs' and the consistency student's guidance to the base model's best)."""
    return float(ProbeCard.from_manifest(store.get_ref(probe_ref)).best_guidance)
