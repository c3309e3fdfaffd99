"""What the evaluation measures: one :class:`Cell` per (model, sampler, steps, guidance), and its inputs.

For each generator (base, each reflow round, consistency, flowmap, ddpm), each of its samplers and step
counts, and each guidance scale of ``evaluate.guidance`` (for samplers that take classifier-free
guidance, on labelled data; :func:`cell_scales`) the evaluation draws ``n`` images and scores
them; the straightness of each ODE model's paths is measured once. Plain code: no Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from infra.cards import GeneratorCard
from infra.config import ConfigError, EvaluateConfig
from infra.store import Manifest, Store
from workers.evaluation.grids import grid_file

log = logging.getLogger("fewstep.evaluate")


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
        "flowmap": tuple(sorted(set(config.flowmap_steps))),
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


def check_sizes(config: EvaluateConfig, n_test: int, images_ref: str) -> None:
    """Precision and recall need more than ``knn_k`` images on both sides."""
    if config.n <= config.knn_k:
        raise ConfigError(f"evaluate.n={config.n} must exceed evaluate.knn_k={config.knn_k} for precision and recall")
    if n_test <= config.knn_k:
        raise ConfigError(
            f"the images of {images_ref} have {n_test} test images; FID and precision/recall need more "
            f"than knn_k={config.knn_k}. Use more images or a larger ingest.test_fraction"
        )
