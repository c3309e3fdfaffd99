"""Stage 5, reflow pairs: (x_0, x_1) couplings from the teacher's ODE, on a Ray Data actor pool.

    x_0 ~ N(0, I) seeded per row by (round seed, row id),   x_1 = ODE_teacher(x_0, y)

Rows are {id, label}; label ``i mod K`` for row ``i`` (or the null class without labels).
A re-run reproduces every pair whatever the batching or the number of actors. The pairs
table (fixed-shape tensor columns ``x_0``, ``x_1`` in the scaled latent space) names its
teacher, solver, steps and guidance in its metadata and its :class:`~infra.cards.PairsCard`.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from infra.cards import GeneratorCard, PairsCard
from infra.config import PairsConfig
from infra.store import Manifest, StageWriter, Store
from infra.tables import tensors_to_table
from models.registry import build_model, model_spec
from models.samplers import sample_ode
from workers import progress
from workers.data import preserved_order
from workers.generator import cpu_state, load_network, seeded_normal
from workers.runner import run_stage
from workers.runtime import current_node, remote_options

STAGE = "pairs"
ROUND_SEED_OFFSET = 17  # round k draws its x_0 from seed k + 17


class PairSampler:
    """Ray Data class UDF: holds the teacher once; maps rows {id, label} to {x_0, x_1, label}."""

    def __init__(self, spec: dict, state: dict[str, Tensor], shape: tuple[int, ...], seed: int,
                 solver: str, steps: int, guidance: float, device: str = "auto"):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
        self.model = build_model(spec)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.shape, self.seed = tuple(shape), seed
        self.solver, self.steps, self.guidance = solver, steps, guidance
        self.node = current_node()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x_0 = seeded_normal(self.seed, batch["id"], self.shape)[0].to(self.device)  # (B, C, H, W)
        y = torch.as_tensor(batch["label"], dtype=torch.long, device=self.device)
        x_1 = sample_ode(self.model, x_0, y, self.steps, self.solver, self.guidance).x_1
        return {"id": batch["id"], "label": batch["label"],
                "x_0": x_0.cpu().numpy().astype(np.float32), "x_1": x_1.cpu().numpy().astype(np.float32),
                "node": np.full(len(batch["id"]), self.node)}  # which Ray node drew it; not stored


def run_pairs(store: Store, config: PairsConfig, teacher: Manifest, round_index: int) -> Manifest:
    """Pairs from ``teacher`` for reflow round ``round_index``; returns the pairs manifest."""
    import ray

    space = GeneratorCard.from_manifest(teacher).space
    section = {**config.keyed(), "round": round_index}

    def build(writer: StageWriter, key: str) -> PairsCard:
        model = load_network(store, teacher)
        k = max(1, space.num_classes)
        rows = ray.data.from_items([{"id": i, "label": i % k if space.num_classes else 0} for i in range(config.pairs)])
        resources = config.resources
        pairs = rows.map_batches(
            PairSampler,
            fn_constructor_kwargs=dict(spec=model_spec(model), state=cpu_state(model), shape=space.latent_shape,
                                       seed=round_index + ROUND_SEED_OFFSET, solver=config.solver,
                                       steps=config.steps, guidance=config.guidance),
            batch_size=config.batch_size, compute=ray.data.ActorPoolStrategy(size=resources.workers),
            **remote_options(resources),
        )
        columns: dict[str, list[np.ndarray]] = {"id": [], "label": [], "x_0": [], "x_1": []}
        nodes: set[str] = set()
        with preserved_order():
            for batch in pairs.iter_batches(batch_size=None, batch_format="numpy"):
                for name in columns:
                    columns[name].append(np.asarray(batch[name]))
                nodes.update(str(node) for node in np.unique(batch["node"]))
                progress.advance(STAGE, sum(len(part) for part in columns["id"]), config.pairs)
        arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
        order = np.argsort(arrays["id"])
        table = tensors_to_table({name: array[order] for name, array in arrays.items()})
        writer.write_table("pairs", table, metadata={
            "fewstep.teacher": teacher.ref, "fewstep.teacher_digest": teacher.digest,
            "fewstep.solver": config.solver, "fewstep.steps": str(config.steps),
            "fewstep.guidance": str(config.guidance),
        })
        return PairsCard(pairs=int(len(order)), teacher_ref=teacher.ref, round=round_index, solver=config.solver,
                         steps=config.steps, guidance=config.guidance, sampler_nodes=tuple(sorted(nodes)),
                         **space.space_fields())

    return run_stage(store, STAGE, section, [teacher], build, source=__name__)
