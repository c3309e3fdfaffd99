"""Stage 15, lora: LCM-LoRA, a consistency student that is an adapter on the frozen base model.

    f_theta(x_t, t, y) = x_t + (1 - t) v_{base + BA}(x_t, t, y)

The network is the base DiT with low-rank adapters on its blocks' projections (models/lora.py;
zero-initialised, so training starts from the base), and only the adapters train, by consistency
distillation of the base on the latents with fresh noise (models/consistency.py), as Luo et al.
(2023) train LCM-LoRA. The stage stores the adapter alone (``adapter``: its EMA weights; ``adapter_raw``:
the trained ones; ``adapter_spec``), because its card names the base it goes on (``adapter_of``):
:func:`workers.generator.load_network` puts the two together.
"""

from __future__ import annotations

from infra.cards import GeneratorCard
from infra.config import LoRAConfig
from infra.store import Manifest, Store
from models.lora import adapter_state, lora_from_velocity
from models.registry import model_spec
from workers.data import training_dataset
from workers.distill import consistency_objective, distillation_data
from workers.generator import cpu_state, load_network
from workers.guidance import require_guidance
from workers.recipe import Recipe, run_generator_stage
from workers.train import check_rows

STAGE = "lora"


def run_lora(store: Store, config: LoRAConfig, base: Manifest, data: Manifest) -> Manifest:
    """The LCM-LoRA adapter of flow model ``base`` on the latents ``data`` at ``config.guidance`` (a
    number: the flow resolves None first); returns its manifest (the adapter, not the base)."""
    guidance = require_guidance(STAGE, config.guidance)
    space = GeneratorCard.from_manifest(base).space
    rows, table, columns, adapt = distillation_data(store, data)
    check_rows(STAGE, rows, config)

    def recipe() -> Recipe:
        base_net = load_network(store, base)
        student = lora_from_velocity(base_net, config.rank, config.alpha, tuple(config.targets))
        adapter = sum(v.numel() for v in adapter_state(student).values())
        return Recipe(
            dataset=training_dataset(store, data, table, columns),
            adapt_batch=adapt,
            model_spec=model_spec(student),
            objective=consistency_objective(config, base_net, student, guidance),
            init_state=cpu_state(student),
            card=dict(
                family="consistency",
                guidance=guidance,
                teacher_ref=base.ref,
                data_ref=data.ref,
                adapter_of=base.ref,
                adapter_fraction=adapter / sum(p.numel() for p in base_net.parameters()),
                renoise_coupling=0.0,  # fresh noise: the base teacher's independent coupling
                num_intervals=config.intervals if config.grid_times else None,
                **space.space_fields(),
            ),
        )

    return run_generator_stage(store, STAGE, config, [base, data], recipe, source=__name__)
