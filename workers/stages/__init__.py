"""The pipeline's stages, one module each, in pipeline order.

    s01_ingest       images in -> the images table
    s02_vae          a KL-VAE and the measured latent scale
    s03_latents      every image through the encoder (Ray Data actor pool)
    s04_base         flow matching of a DiT (Ray Train)
    s05_pairs        reflow pairs from the teacher's ODE (Ray Data actor pool)
    s06_reflow       flow matching on the pairs (Ray Train), once per round
    s07_consistency  consistency distillation into a 1-4 step student (Ray Train)
    s08_ddpm         optional: the DDPM baseline, eps-prediction of the same DiT (Ray Train)
    s09_features     the evaluation's feature space: a classifier, or an encoder for unlabelled data
    s10_evaluate     FID against steps for every model (Ray tasks)
    s11_promote      move serving/current when the candidate learned and is not worse (plain code)
    s12_probe        after each generator stage: has it learned? a few hundred samples per guidance
    s13_flowmap      optional: a flow-map student (MeanFlow or Shortcut) sampled at any step count (Ray Train)

A stage never imports another stage: what two stages share lives in a library module of
``workers/`` (pixels, data, batches, generator, train, runner, scoring, report, ...).
"""

from __future__ import annotations

# stage name -> the module that writes it (its import closure versions the stage's keys)
STAGE_MODULES = {
    "ingest": "workers.stages.s01_ingest",
    "vae": "workers.stages.s02_vae",
    "latents": "workers.stages.s03_latents",
    "base": "workers.stages.s04_base",
    "pairs": "workers.stages.s05_pairs",
    "reflow": "workers.stages.s06_reflow",
    "consistency": "workers.stages.s07_consistency",
    "ddpm": "workers.stages.s08_ddpm",
    "features": "workers.stages.s09_features",
    "evaluate": "workers.stages.s10_evaluate",
    "probe": "workers.stages.s12_probe",
    "flowmap": "workers.stages.s13_flowmap",
}


def stage_code_versions() -> dict[str, str]:
    """stage name -> the code version a run would key it with today."""
    from infra.version import code_version

    return {stage: code_version(module) for stage, module in STAGE_MODULES.items()}
