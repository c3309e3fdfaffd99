"""What a distillation stage (consistency, flowmap) trains on: the latents with fresh noise, or a
reflow round's stored pairs (x_0, x_1). Shared by the stages, which never import each other."""

from __future__ import annotations

from torch import nn

from infra.cards import LatentsCard, PairsCard
from infra.store import Manifest, Store
from models.consistency import ConsistencyDistillation
from workers.batches import LatentBatch, PairBatch


def distillation_data(store: Store, data: Manifest):
    """(training rows, table, columns, batch adapter) of the distillation data: pairs, or latents (fresh noise)."""
    if data.stage == "pairs":
        pairs = PairsCard.from_manifest(data)
        return pairs.pairs, "pairs", ["x_0", "x_1", "label"], PairBatch(pairs.num_classes)
    latents = LatentsCard.from_manifest(data)
    return latents.n_train, "latents", ["mean", "logvar", "label"], LatentBatch.of(latents)


def consistency_objective(section, teacher: nn.Module, student: nn.Module, guidance: float) -> ConsistencyDistillation:
    """Consistency distillation of ``teacher`` into ``student`` as a section (consistency, lora) configures
    it: its grid of ``intervals``, teacher solver, EMA target decay, Huber c and label dropout."""
    return ConsistencyDistillation(
        teacher=teacher,
        student=student,
        num_intervals=section.intervals,
        solver=section.teacher_solver,
        guidance=guidance,
        ema_decay=section.target_decay,
        c=section.huber_c,
        label_dropout=section.label_dropout,
    )
