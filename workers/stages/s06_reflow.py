"""Stage 6, reflow (one round): flow matching on the teacher's pairs, warm-started from it.

    x_t = (1 - t) x_0 + t x_1 with (x_0, x_1) a stored coupling,   L = E || v(x_t, t, y) - (x_1 - x_0) ||^2

(Liu et al. 2023, rectified flow). The same loop and objective as the base stage; only the
data differ: the noise is the pair's own x_0, not a fresh draw. The new model's paths are
straighter, so it samples well in fewer steps. It is sampled at its pairs' guidance.

The pairs table has no test split: the held-out loss at each checkpoint is the base stage's,
on the test latents the teacher descends from with fixed independent noise (:mod:`workers.heldout`).
"""

from __future__ import annotations

from infra.cards import GeneratorCard, PairsCard
from infra.config import ReflowConfig
from infra.store import Manifest, StageWriter, Store
from models.objectives import FlowMatching
from models.paths import time_sampler
from models.registry import model_spec
from workers.batches import PairBatch
from workers.data import training_dataset
from workers.generator import cpu_state, load_network, write_generator
from workers.heldout import card_fields, heldout_set, source_latents
from workers.runner import run_stage
from workers.train import TrainJob, check_rows, fit

STAGE = "reflow"


def run_reflow(store: Store, config: ReflowConfig, teacher: Manifest, pairs: Manifest, round_index: int) -> Manifest:
    """Reflow round ``round_index`` on ``pairs`` made by ``teacher``; returns the new generator's manifest."""
    data = PairsCard.from_manifest(pairs)
    GeneratorCard.from_manifest(teacher)  # a generator, or a clear error
    section = {**config.keyed(), "round": round_index}
    check_rows(STAGE, data.pairs, config)

    def build(writer: StageWriter, key: str) -> GeneratorCard:
        teacher_net = load_network(store, teacher)
        spec = model_spec(teacher_net)
        latents = source_latents(store, teacher)
        heldout = latents and heldout_set(
            store, latents, config.heldout_rows, note=" (the pairs table has no test split: independent noise)"
        )
        job = TrainJob(
            store=store,
            stage=STAGE,
            key=key,
            model_spec=spec,
            objective=FlowMatching(time_sampler(config.time_sampling), label_dropout=config.class_dropout),
            config=config,
            adapt_batch=PairBatch(data.num_classes),
            init_state=cpu_state(teacher_net),
            heldout=heldout,
        )
        result = fit(job, training_dataset(store, pairs, "pairs", ["x_0", "x_1", "label"]))
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
            guidance=data.guidance,
            round=round_index,
            teacher_ref=teacher.ref,
            data_ref=pairs.ref,
            **data.space_fields(),
        )

    return run_stage(store, STAGE, section, [teacher, pairs], build, source=__name__)
