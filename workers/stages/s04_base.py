"""Stage 4, base: flow matching of a DiT with AdaLN-Zero on the latents.

    x_1 = latent_scale * (mean + exp(logvar / 2) * eps)     a fresh posterior sample per batch
    x_0 ~ N(0, I),  t ~ p(t),  x_t = (1 - t) x_0 + t x_1,   L = E || v(x_t, t, y) - (x_1 - x_0) ||^2

trained by the one loop (:func:`workers.train.fit`) with :class:`~models.objectives.FlowMatching`
(label dropout for classifier-free guidance). Writes a flow-family generator: ``model``
(EMA weights), ``raw``, ``curve`` and a :class:`~infra.cards.GeneratorCard`. The curve holds the
held-out loss on the test latents at each checkpoint (:mod:`workers.heldout`).
"""

from __future__ import annotations

from infra.cards import GeneratorCard, LatentsCard
from infra.config import GeneratorConfig
from infra.store import Manifest, StageWriter, Store
from models.objectives import FlowMatching
from models.paths import time_sampler
from workers.batches import LatentBatch
from workers.data import training_dataset
from workers.generator import dit_spec, write_generator
from workers.heldout import card_fields, heldout_set
from workers.runner import run_stage
from workers.train import TrainJob, check_rows, fit

STAGE = "base"


def run_base(store: Store, config: GeneratorConfig, latents: Manifest) -> Manifest:
    """Flow matching of a DiT on the latents; returns the base generator's manifest."""
    data = LatentsCard.from_manifest(latents)
    check_rows(STAGE, data.n_train, config)

    def build(writer: StageWriter, key: str) -> GeneratorCard:
        spec = dit_spec(config, data)
        heldout = heldout_set(store, latents, config.heldout_rows)
        job = TrainJob(
            store=store,
            stage=STAGE,
            key=key,
            model_spec=spec,
            objective=FlowMatching(time_sampler(config.time_sampling), label_dropout=config.class_dropout),
            config=config,
            adapt_batch=LatentBatch.of(data),
            heldout=heldout,
        )
        result = fit(job, training_dataset(store, latents, "latents", ["mean", "logvar", "label"]))
        write_generator(
            writer,
            spec,
            result.model_state,
            result.ema_state,
            result.curve,
            result.resumed_from,
            heldout and heldout.description,
        )
        return GeneratorCard(
            family="flow",
            steps=result.step,
            final_loss=result.final_loss,
            **card_fields(result, heldout),
            resumed_from=result.resumed_from,
            nodes=tuple(result.nodes),
            **data.space_fields(),
        )

    return run_stage(store, STAGE, config, [latents], build, source=__name__)
