"""Stage 8, ddpm (optional): the diffusion baseline, the same DiT trained with eps-prediction.

    x_1 = latent_scale * (mean + exp(logvar / 2) * eps)        a fresh posterior sample per batch
    k ~ U{0..T-1},  eps ~ N(0, I),  x_k = sqrt(abar_k) x_1 + sqrt(1 - abar_k) eps
    L = E || eps - eps_theta(x_k, t(k), y) ||^2

trained by :func:`workers.recipe.run_generator_stage` with :class:`~models.diffusion.DDPMObjective`
on the same latents, the same DiT (:func:`workers.generator.dit_spec`) and the same label dropout
as the base stage, so the evaluation compares what the training objective buys, nothing else.

Diffusion time on the network: the model keeps fewstep's call ``model(x, t, y)`` with t in
[0, 1], t = 0 noise. Step k of the T-step chain (k = T-1 the noisiest) is fed as

    t(k) = 1 - (k + 1) / T        (models.diffusion.network_time, the one place this is done)

so the noisiest step is t = 0 like fewstep's x_0, the cleanest is t = 1 - 1/T, and with the
DiT's time scale of 1000 a T = 1000 model sees the integer timesteps 999 - k. The network's
output is eps_hat, not a velocity: only the ``diffusion`` family's samplers (DDIM, DDPM in
:mod:`models.sampling`, built from this card's schedule name and T) may draw from it.

A diffusion-family generator whose :class:`~infra.cards.GeneratorCard` names its schedule and T. It is evaluated beside the flow
models; the pipeline never promotes it (that is the consistency student's place), but it can be
served like any generator.
"""

from __future__ import annotations

from infra.cards import LatentsCard
from infra.config import DDPMConfig
from infra.store import Manifest, Store
from models.diffusion import DDPMObjective, vp_schedule
from workers.batches import LatentBatch
from workers.data import training_dataset
from workers.generator import dit_spec
from workers.heldout import heldout_set
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows

STAGE = "ddpm"
FAMILY = "diffusion"


def run_ddpm(store: Store, config: DDPMConfig, latents: Manifest) -> Manifest:
    """eps-prediction of a DiT on the latents' VP diffusion path; returns the ddpm generator's manifest."""
    data = LatentsCard.from_manifest(latents)
    check_rows(STAGE, data.n_train, config)
    schedule = vp_schedule(config.schedule, config.diffusion_steps)

    def recipe() -> Recipe:
        return Recipe(
            dataset=training_dataset(store, latents, "latents", ["mean", "logvar", "label"]),
            adapt_batch=LatentBatch.of(data),
            model_spec=dit_spec(config, data),
            objective=DDPMObjective(schedule, label_dropout=config.label_dropout),
            heldout=heldout_set(store, latents, config.heldout_rows),
            card=dict(
                family=FAMILY,
                diffusion_schedule=schedule.name,
                diffusion_steps=schedule.num_steps,
                **data.space_fields(),
            ),
        )

    return run_generator_stage(store, STAGE, config, [latents], recipe, source=__name__)
