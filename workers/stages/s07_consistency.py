"""Stage 7, consistency: distil the last flow model into a 1-4 step student.

    f_theta(x_t, t, y) = x_t + (1 - t) v_theta(x_t, t, y)          (f(x, 1) = x exactly)
    L = E_n d( f_theta(x_{t_n}, t_n), stopgrad f_theta^-(x_hat_{t_{n+1}}, t_{n+1}) )

with x_hat the teacher's one ODE step and f_theta^- an EMA target (see
:class:`~models.consistency.ConsistencyDistillation`). The student starts from the teacher's
weights and is trained by the one loop on the latents (fresh noise) or the last round's pairs,
with label dropout so unconditional requests are trained too. The card records how the student
is sampled: re-noised along x_0 for a reflow teacher (coupled), with fresh noise for the base
teacher, at times on the distillation grid.
"""

from __future__ import annotations

from infra.cards import GeneratorCard
from infra.config import ConsistencyConfig
from infra.store import Manifest, Store
from models.registry import build_model, model_spec
from workers.data import training_dataset
from workers.distill import consistency_objective, distillation_data
from workers.generator import cpu_state, load_network
from workers.guidance import require_guidance
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows
from workers.warm import WarmStart, compatible

STAGE = "consistency"


def renoise_coupling(config: ConsistencyConfig, teacher: Manifest) -> float:
    """How the student is re-noised between steps: along its x_0 (1.0) when the teacher is a
    coupled (reflow) model, with fresh noise (0.0) for the base teacher's independent coupling."""
    coupled = config.renoise == "coupled" or (
        config.renoise == "auto" and GeneratorCard.from_manifest(teacher).round is not None
    )
    return 1.0 if coupled else 0.0


def run_consistency(
    store: Store, config: ConsistencyConfig, teacher: Manifest, data: Manifest, warm: WarmStart | None = None
) -> Manifest:
    """Consistency distillation of ``teacher`` on ``data`` (latents or pairs) at ``config.guidance``
    (a number: the flow resolves None first); returns the student's manifest. The student starts
    from the teacher's weights, or from ``warm``'s parent (the served student) and its EMA."""
    guidance = require_guidance(STAGE, config.guidance)
    space = GeneratorCard.from_manifest(teacher).space
    rows, table, columns, adapt = distillation_data(store, data)
    check_rows(STAGE, rows, config)
    if warm is not None:
        warm = compatible(store, warm, store.read_json(teacher, "model.json"), STAGE)

    def recipe() -> Recipe:
        teacher_net = load_network(store, teacher)
        spec = model_spec(teacher_net)
        state = warm.raw if warm is not None else cpu_state(teacher_net)
        student = build_model(spec)
        student.load_state_dict(state)
        return Recipe(
            dataset=training_dataset(store, data, table, columns),
            adapt_batch=adapt,
            model_spec=spec,
            objective=consistency_objective(config, teacher_net, student, guidance),
            init_state=state,
            card=dict(
                family="consistency",
                guidance=guidance,
                teacher_ref=teacher.ref,
                data_ref=data.ref,
                renoise_coupling=renoise_coupling(config, teacher),
                num_intervals=config.intervals if config.grid_times else None,
                **space.space_fields(),
            ),
        )

    return run_generator_stage(store, STAGE, config, [teacher, data], recipe, source=__name__, warm=warm)
