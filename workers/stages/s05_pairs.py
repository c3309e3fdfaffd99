"""Stage 5, reflow pairs: (x_0, x_1) couplings from the teacher's ODE, on a Ray Data actor pool.

    x_0 ~ N(0, I) seeded per row by (round seed, row id),   x_1 = ODE_teacher(x_0, y)

Rows are {id, label}; label ``i mod K`` for row ``i`` (or the null class without labels).
A re-run reproduces every pair whatever the batching or the number of actors. The pairs
table (fixed-shape tensor columns ``x_0``, ``x_1`` in the scaled latent space) names its
teacher, solver, steps and guidance in its metadata and its :class:`~infra.cards.PairsCard`.

Streaming: the ids come from ``ray.data.range`` and the pairs go straight from the actors to
Ray Data tasks that write them as ordered parts, ``pairs/part-<first id>.parquet``
(:mod:`workers.parts`); the driver only counts them, so its memory does not grow with ``pairs``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from infra.cards import GeneratorCard, PairsCard
from infra.config import PairsConfig
from infra.store import Manifest, StageWriter, Store
from infra.tables import table_column_to_numpy, tensors_to_table
from models.registry import build_model, model_spec
from models.samplers import sample_ode
from workers import progress
from workers.generator import cpu_state, load_network, seeded_normal
from workers.guidance import require_guidance
from workers.parts import add_written, rows_per_part, write_parts
from workers.runner import run_stage
from workers.runtime import current_node, remote_options, threads_for, use_threads, worker_env

STAGE = "pairs"
ROUND_SEED_OFFSET = 17  # round k draws its x_0 from seed k + 17


class PairSampler:
    """Ray Data class UDF: holds the teacher once; maps rows {id, label} to {x_0, x_1, label}."""

    def __init__(
        self,
        spec: dict,
        state: dict[str, Tensor],
        shape: tuple[int, ...],
        seed: int,
        solver: str,
        steps: int,
        guidance: float,
        device: str = "auto",
        threads: int | None = None,
    ):
        use_threads(threads)
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
        return {
            "id": batch["id"],
            "label": batch["label"],
            "x_0": x_0.cpu().numpy().astype(np.float32),
            "x_1": x_1.cpu().numpy().astype(np.float32),
            "node": np.full(len(batch["id"]), self.node),
        }  # which Ray node drew it; not stored


def with_labels(batch: dict[str, np.ndarray], num_classes: int) -> dict[str, np.ndarray]:
    """Ray Data UDF: ids -> {id, label}, label = id mod K (the null class 0 when K = 0)."""
    ids = np.asarray(batch["id"], dtype=np.int64)
    return {"id": ids, "label": ids % num_classes if num_classes else np.zeros_like(ids)}


def pair_tables(batch: pa.Table) -> tuple[dict[str, pa.Table], dict]:
    """One part of sampled pairs -> the ``pairs`` table (fixed-shape tensor columns), and the Ray
    nodes whose actors drew it (comma-separated; recorded in the card, not stored in the table)."""
    columns = {name: table_column_to_numpy(batch, name) for name in ("id", "label", "x_0", "x_1")}
    nodes = sorted(set(batch["node"].to_pylist())) if "node" in batch.column_names else []
    return {"pairs": tensors_to_table(columns)}, {"nodes": ",".join(nodes)}


def run_pairs(store: Store, config: PairsConfig, teacher: Manifest, round_index: int) -> Manifest:
    """Pairs from ``teacher`` for reflow round ``round_index``, at ``config.guidance`` (a number:
    the flow resolves None first); returns the pairs manifest."""
    import ray

    guidance = require_guidance(STAGE, config.guidance)
    space = GeneratorCard.from_manifest(teacher).space

    def build(writer: StageWriter, key: str) -> PairsCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        model = load_network(store, teacher)
        resources = config.resources
        threads = threads_for(resources.cpus, resources.workers, data_cores=0)
        # One block per sampler batch, so every actor of the pool gets work (a range of a few
        # hundred ids is otherwise one or two blocks, which one actor may take alone).
        blocks = max(resources.workers, min(-(-config.pairs // config.batch_size), 4096))
        rows = ray.data.range(config.pairs, override_num_blocks=blocks).map_batches(
            with_labels, batch_format="numpy", fn_kwargs={"num_classes": space.num_classes}
        )
        pairs = rows.map_batches(
            PairSampler,
            fn_constructor_kwargs=dict(
                spec=model_spec(model),
                state=cpu_state(model),
                shape=space.latent_shape,
                seed=round_index + ROUND_SEED_OFFSET,
                solver=config.solver,
                steps=config.steps,
                guidance=guidance,
                threads=threads,
            ),
            batch_size=config.batch_size,
            compute=ray.data.ActorPoolStrategy(
                size=resources.workers, max_tasks_in_flight_per_actor=2
            ),  # an ODE batch is long: queue little, spread
            **remote_options(resources),
            runtime_env={"env_vars": worker_env(threads)},
        )
        metadata = {
            "fewstep.teacher": teacher.ref,
            "fewstep.teacher_digest": teacher.digest,
            "fewstep.solver": config.solver,
            "fewstep.steps": str(config.steps),
            "fewstep.guidance": str(guidance),
        }
        row_bytes = 2 * 4 * int(np.prod(space.latent_shape))
        parts = []
        nodes: set[str] = set()
        for stats in write_parts(pairs, writer, pair_tables, rows_per_part(row_bytes), metadata):
            parts.append(stats)
            nodes.update(node for node in stats["nodes"].split(",") if node)
            progress.advance(STAGE, sum(p["rows"] for p in parts), config.pairs)
        add_written(writer, parts)
        return PairsCard(
            pairs=sum(p["rows"] for p in parts),
            teacher_ref=teacher.ref,
            round=round_index,
            solver=config.solver,
            steps=config.steps,
            guidance=guidance,
            sampler_nodes=tuple(sorted(nodes)),
            **space.space_fields(),
        )

    return run_stage(store, STAGE, config, [teacher], build, source=__name__, extra_key={"round": round_index})
