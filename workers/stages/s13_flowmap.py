"""Stage 13, flowmap: distil a flow teacher into a flow-map student, good at one step and better at more.

    x_t = x_s + (t - s) u_theta(x_s, s, t),      u_theta(z, s, s) = v(z, s)

The student is the teacher's DiT with a second time input whose embedding starts at zero
(models/flowmap_dit.py), so training starts from the teacher itself; MeanFlow (a JVP target) or
Shortcut (two half steps of itself as the target of one) trains it, by the one loop, on the latents
(fresh noise) or the last reflow round's pairs (models/flowmap.py). The card names the family
("flowmap": k jumps on the times i / k) and whether it takes guidance when sampled.
"""

from __future__ import annotations

from torch import nn

from infra.cards import GeneratorCard
from infra.config import ConfigError, FlowMapConfig
from infra.store import Manifest, Store
from models.flowmap import FlowMapDistillation, MeanFlow, Shortcut
from models.flowmap_dit import flowmap_from_velocity
from models.paths import time_sampler
from models.registry import model_spec
from workers.data import training_dataset
from workers.distill import distillation_data
from workers.generator import cpu_state, load_network
from workers.guidance import require_guidance
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows

STAGE = "flowmap"
# The loss weighting each objective trains stably with (infra.config.FlowMapConfig.adaptive_p).
DEFAULT_P = {"meanflow": 1.0, "shortcut": 0.0}


def flowmap_objective(config: FlowMapConfig, teacher: nn.Module, guidance: float) -> FlowMapDistillation:
    """The configured objective, resolved once from its name."""
    common = dict(
        guidance=guidance,
        equal_fraction=config.equal_fraction,
        time_sampler=time_sampler(config.time_sampling),
        adaptive_p=config.adaptive_p if config.adaptive_p is not None else DEFAULT_P[config.objective],
        adaptive_c=config.adaptive_c,
        label_dropout=config.label_dropout,
    )
    if config.objective == "shortcut":
        return Shortcut(teacher, min_gap=2.0 ** -(config.shortcut_levels - 1), **common)
    return MeanFlow(teacher, **common)


def run_flowmap(store: Store, config: FlowMapConfig, teacher: Manifest, data: Manifest) -> Manifest:
    """The flow-map student of ``teacher`` on ``data`` (latents or pairs) at ``config.guidance`` (a
    number: the flow resolves None first; 1 when guidance is applied at sampling); its manifest."""
    guidance = require_guidance(STAGE, config.guidance)
    if config.guidance_mode == "sampling" and guidance != 1.0:
        raise ConfigError(f"guidance_mode sampling distils at guidance 1, got flowmap.guidance={guidance}")
    space = GeneratorCard.from_manifest(teacher).space
    rows, table, columns, adapt = distillation_data(store, data)
    check_rows(STAGE, rows, config)

    def recipe() -> Recipe:
        teacher_net = load_network(store, teacher)
        student = flowmap_from_velocity(teacher_net)
        sampled_guided = config.guidance_mode == "sampling"
        return Recipe(
            dataset=training_dataset(store, data, table, columns),
            adapt_batch=adapt,
            model_spec=model_spec(student),
            objective=flowmap_objective(config, teacher_net, guidance),
            init_state=cpu_state(student),
            card=dict(
                family="flowmap",
                guidance=None if sampled_guided else guidance,
                guided_sampling=sampled_guided,
                objective=config.objective,
                teacher_ref=teacher.ref,
                data_ref=data.ref,
                **space.space_fields(),
            ),
        )

    return run_generator_stage(store, STAGE, config, [teacher, data], recipe, source=__name__)
