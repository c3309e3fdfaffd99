"""Stage 14, guidance_distill: the base model's classifier-free guidance learnt into one network pass.

    net(x_t, t, y, w) ~ v_u + w (v_c - v_u),     w ~ U(scales)

The student is the base DiT with the scale as a second conditioning input whose embedding starts at
zero (models/guided_dit.py), so training starts from the base's conditional velocity; it is trained
by the one loop on the latents with fresh noise (models/guidance_distill.py). It is a flow model: the
evaluation scores it at the evaluation's guidance scales, each one pass a step where the base takes
two, and the students may distil it (``teacher: guided``).
"""

from __future__ import annotations

from infra.cards import GeneratorCard
from infra.config import ConfigError, GuidanceDistillConfig
from infra.store import Manifest, Store
from models.guidance_distill import GuidanceDistillation
from models.guided_dit import guided_from_velocity
from models.paths import time_sampler
from models.registry import model_spec
from workers.data import training_dataset
from workers.distill import distillation_data
from workers.generator import cpu_state, load_network
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows

STAGE = "guidance_distill"


def run_guidance_distill(store: Store, config: GuidanceDistillConfig, teacher: Manifest, data: Manifest) -> Manifest:
    """The guidance-distilled network of flow model ``teacher`` (the base) on the latents ``data``; its manifest."""
    space = GeneratorCard.from_manifest(teacher).space
    if space.num_classes == 0:
        raise ConfigError(
            "guidance distillation needs labelled data: classifier-free guidance contrasts a class with "
            "the null label; set guidance_distill.enabled: false for an unlabelled folder"
        )
    rows, table, columns, adapt = distillation_data(store, data)
    check_rows(STAGE, rows, config)

    def recipe() -> Recipe:
        teacher_net = load_network(store, teacher)
        student = guided_from_velocity(teacher_net)
        return Recipe(
            dataset=training_dataset(store, data, table, columns),
            adapt_batch=adapt,
            model_spec=model_spec(student),
            objective=GuidanceDistillation(
                teacher_net,
                scales=tuple(config.scales),
                time_sampler=time_sampler(config.time_sampling),
                label_dropout=config.label_dropout,
                conditional_fraction=config.conditional_fraction,
            ),
            init_state=cpu_state(student),
            card=dict(family="flow", teacher_ref=teacher.ref, data_ref=data.ref, **space.space_fields()),
        )

    return run_generator_stage(store, STAGE, config, [teacher, data], recipe, source=__name__)
