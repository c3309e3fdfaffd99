"""Stage 10, evaluate: FID against NFE for every model of a run, on Ray.

The stage entry only: it checks its inputs, keys the stage and commits what
:mod:`workers.evaluation` computes (what to measure: ``plan``; the Ray tasks: ``tasks``; each
number: ``measure``; the typed row and its ranking: ``table``; the files: ``outputs``).

Outputs: ``metrics`` (Parquet, :mod:`workers.evaluation.table`), ``fid_draws``,
``fid_vs_nfe.png``, ``grids/<model>-<sampler>-<steps>-g<guidance>.png`` (plus
``grids/real-test.png`` and ``grids/vae-recon.png``), ``straightness`` (JSON), ``report.md``
and an :class:`~infra.cards.EvaluationCard`.
"""

from __future__ import annotations

from collections.abc import Sequence

from infra.cards import ImagesCard, VAECard
from infra.config import EvaluateConfig
from infra.store import Manifest, StageWriter, Store
from workers.evaluation.outputs import write_evaluation
from workers.evaluation.plan import check_sizes, evaluation_inputs
from workers.evaluation.scoring import extractor_source
from workers.evaluation.tasks import STAGE, compute_evaluation
from workers.runner import run_stage


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
    # One VAE decodes them all; the images are the run's own: those the VAE was trained on, or a
    # grown set it was kept for (workers.warm), where the champion trained on the set before.
    _, found_vae = evaluation_inputs(store, generators)
    if found_vae.ref != vae.ref:
        raise ValueError(
            f"the generators decode through {found_vae.ref}, but evaluate got {vae.ref}; pass the run's own vae"
        )
    vae_card, images_card = VAECard.from_manifest(vae), ImagesCard.from_manifest(images)
    if (images_card.image_size, images_card.channels) != (vae_card.image_size, vae_card.in_channels):
        raise ValueError(
            f"the images of {images.ref} are {images_card.image_size}px with {images_card.channels} channel(s), "
            f"but {vae.ref} is for {vae_card.image_size}px with {vae_card.in_channels}; pass the run's own images"
        )
    check_sizes(config, images_card.n_test, images.ref)
    source = extractor_source(config, features)
    inputs = [images, vae, *([features] if features is not None else []), *generators]
    # The key: what changes the numbers (not where they run); a user extractor by its digest.
    section = {**config.keyed(), "extractor_sha256": source.sha256}

    def build(writer: StageWriter, key: str):
        return write_evaluation(writer, compute_evaluation(store, config, generators, images, vae, features, source))

    return run_stage(store, STAGE, section, inputs, build, source=__name__)
