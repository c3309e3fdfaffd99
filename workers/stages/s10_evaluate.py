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
