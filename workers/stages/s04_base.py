"""Stage 4, base: flow matching of a DiT with AdaLN-Zero on the latents.

    x_1 = latent_scale * (mean + exp(logvar / 2) * eps)     a fresh posterior sample per batch
    x_0 ~ N(0, I),  t ~ p(t),  x_t = (1 - t) x_0 + t x_1,   L = E || v(x_t, t, y) - (x_1 - x_0) ||^2

trained by :func:`workers.recipe.run_generator_stage` with :class:`~models.objectives.FlowMatching`
(label dropout for classifier-free guidance): a flow-family generator whose curve holds the
held-out loss on the test latents at each checkpoint (:mod:`workers.heldout`).
"""

from __future__ import annotations

from infra.cards import LatentsCard
from infra.config import GeneratorConfig
from infra.store import Manifest, Store
from models.objectives import FlowMatching
from models.paths import time_sampler
from workers.batches import LatentBatch
from workers.data import training_dataset
from workers.generator import dit_spec
from workers.heldout import heldout_set
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows
from workers.warm import WarmStart, compatible

STAGE = "base"


def run_base(store: Store, config: GeneratorConfig, latents: Manifest, warm: WarmStart | None = None) -> Manifest:
    """Flow matching of a DiT on the latents (from ``warm``'s parent, if given); returns the base generator's manifest."""
    data = LatentsCard.from_manifest(latents)
    check_rows(STAGE, data.n_train, config)
    spec = dit_spec(config, data)
    warm = compatible(store, warm, spec, STAGE)

    def recipe() -> Recipe:
        return Recipe(
            dataset=training_dataset(store, latents, "latents", ["mean", "logvar", "label"]),
            adapt_batch=LatentBatch.of(data),
            model_spec=spec,
            objective=FlowMatching(time_sampler(config.time_sampling), label_dropout=config.label_dropout),
            heldout=heldout_set(store, latents, config.heldout_rows),
            card=dict(family="flow", **data.space_fields()),
        )

    return run_generator_stage(store, STAGE, config, [latents], recipe, source=__name__, warm=warm)
