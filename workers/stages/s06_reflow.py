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
from infra.store import Manifest, Store
from models.objectives import FlowMatching
from models.paths import time_sampler
from models.registry import model_spec
from workers.batches import PairBatch
from workers.data import training_dataset
from workers.generator import cpu_state, load_network
from workers.heldout import heldout_set, source_latents
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows
from workers.warm import WarmStart, compatible

STAGE = "reflow"


def run_reflow(
    store: Store,
    config: ReflowConfig,
    teacher: Manifest,
    pairs: Manifest,
    round_index: int,
    warm: WarmStart | None = None,
) -> Manifest:
    """Reflow round ``round_index`` on ``pairs`` made by ``teacher``, from the teacher's weights (or
    ``warm``'s parent: the served lineage's round); returns the new generator's manifest."""
    data = PairsCard.from_manifest(pairs)
    GeneratorCard.from_manifest(teacher)  # a generator, or a clear error
    check_rows(STAGE, data.pairs, config)
    if warm is not None:
        warm = compatible(store, warm, store.read_json(teacher, "model.json"), STAGE)

    def recipe() -> Recipe:
        teacher_net = load_network(store, teacher)
        latents = source_latents(store, teacher)
        return Recipe(
            dataset=training_dataset(store, pairs, "pairs", ["x_0", "x_1", "label"]),
            adapt_batch=PairBatch(data.num_classes),
            model_spec=model_spec(teacher_net),
            objective=FlowMatching(time_sampler(config.time_sampling), label_dropout=config.label_dropout),
            init_state=cpu_state(teacher_net),
            heldout=latents
            and heldout_set(
                store, latents, config.heldout_rows, note=" (the pairs table has no test split: independent noise)"
            ),
            card=dict(
                family="flow",
                guidance=data.guidance,
                round=round_index,
                teacher_ref=teacher.ref,
                data_ref=pairs.ref,
                **data.space_fields(),
            ),
        )

    return run_generator_stage(
        store, STAGE, config, [teacher, pairs], recipe, source=__name__, extra_key={"round": round_index}, warm=warm
    )
