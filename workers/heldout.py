"""The held-out loss: where a training run stands, measured the same way at every checkpoint.

The training loss is a running mean over fresh noise, fresh times, dropped labels and a moving
model: it is noisy, and it mixes the unconditional task in. The held-out loss is the objective's
own ``heldout_loss`` (:mod:`models.objectives`) on a fixed set the model never trains on:

- rows: the first ``heldout_rows`` (``infra.config.HeldOutRows``, default 512) rows of the latents table's
  **test split**, in table order, each with its correct label;
- noise and times (or diffusion steps): drawn from a CPU ``torch.Generator`` seeded with
  :data:`HELDOUT_SEED`, fresh at every checkpoint, so every checkpoint sees the same draws;
- weights: the EMA (what is sampled) as ``heldout_loss``, the raw weights as ``heldout_loss_raw``,
  in eval mode, under ``torch.no_grad()``, in float32, on rank 0 only (on the bare module, outside
  DDP), chunked by :data:`CHUNK_ROWS`.

Reflow trains on the pairs table, which has no test split: its held-out set is the same test
latents with the fixed independent noise (the base stage's measurement), and its description
says so. Cost, measured with the shapes preset's DiT-T/2 on its 4x8x8 latents (one CPU thread):
one measurement (2 x 512 rows) takes as long as 2.7 training steps of batch 128, so the base
stage's six checkpoints add 0.5 % to its 3,000 steps (the quick preset, a checkpoint every 50 of
150 steps at batch 64, pays about 10 %, under its Ray Train start-up).

:mod:`workers.curves` reads the curve back (tables, and whether more steps would still help).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from infra.cards import LatentsCard
from infra.store import Manifest, Store
from models.objectives import Objective
from workers.batches import labels_for_training
from workers.data import split_rows

HELDOUT_SEED = 20_240_601  # the generator of the held-out noise and times (any fixed value)
CHUNK_ROWS = 256  # held-out rows per forward pass


@dataclass(frozen=True)
class HeldOut:
    """A fixed objective batch (``{"x_1", "y"}``, on the CPU) and what it is, in words."""

    batch: dict[str, Tensor]
    description: str

    @property
    def rows(self) -> int:
        return int(next(iter(self.batch.values())).shape[0])


def heldout_set(store: Store, latents: Manifest, rows: int, note: str = "") -> HeldOut | None:
    """The first ``rows`` test latents of ``latents`` as an objective batch; None without test rows.

    ``x_1`` is what the generators train on, in the scaled space: the posterior mean, or (when the
    latents card says ``draw: sample``) one posterior sample fixed by :data:`HELDOUT_SEED`.
    """
    card = LatentsCard.from_manifest(latents)
    if rows <= 0 or card.n_test == 0:
        return None
    data = split_rows(store, latents, "latents", "test", ["label", "mean", "logvar"], rows)
    if data is None:
        return None
    z = torch.tensor(data["mean"], dtype=torch.float32)
    if card.draw == "sample":
        eps = torch.randn(z.shape, generator=torch.Generator().manual_seed(HELDOUT_SEED + 1))
        z = z + torch.exp(0.5 * torch.tensor(data["logvar"], dtype=torch.float32)) * eps
    batch = {
        "x_1": z * card.latent_scale,
        "y": labels_for_training(torch.tensor(data["label"], dtype=torch.long), card.num_classes),
    }
    description = (
        f"{len(z)} test latents of {latents.ref} (the first in table order), correct labels, "
        f"fixed noise and times (seed {HELDOUT_SEED}){note}"
    )
    return HeldOut(batch, description)


def card_fields(result: Any, heldout: HeldOut | None) -> dict[str, Any]:
    """The :class:`~infra.cards.GeneratorCard` fields of a run's held-out loss (``result``: a TrainResult)."""
    return {
        "final_heldout_loss": result.final_heldout_loss,
        "final_heldout_loss_raw": result.final_heldout_loss_raw,
        "heldout": heldout.description if heldout is not None else None,
    }


def source_latents(store: Store, manifest: Manifest) -> Manifest | None:
    """The latents a generator descends from: its inputs' lineage walked back to a ``latents`` output."""
    seen, queue = set(), [manifest]
    while queue:
        current = queue.pop(0)
        if current.stage == "latents":
            return current
        for ref in current.inputs:
            if ref not in seen:
                seen.add(ref)
                queue.append(store.get_ref(ref))
    return None


def heldout_losses(
    objective: Objective, nets: Mapping[str, nn.Module], heldout: HeldOut, device: torch.device
) -> dict[str, float]:
    """``{name: held-out loss}`` of each network (e.g. EMA and raw); {} if the objective has none.

    Each network is scored in eval mode under ``torch.no_grad()`` with a generator re-seeded to
    :data:`HELDOUT_SEED`, so the draws are the same for every network and at every checkpoint;
    its train/eval mode is restored afterwards.
    """
    out: dict[str, float] = {}
    rows = heldout.rows
    for name, net in nets.items():
        was_training = net.training
        net.eval()
        generator = torch.Generator().manual_seed(HELDOUT_SEED)
        total = 0.0
        try:
            with torch.no_grad():
                for start in range(0, rows, CHUNK_ROWS):
                    chunk = {k: v[start : start + CHUNK_ROWS].to(device) for k, v in heldout.batch.items()}
                    value = objective.heldout_loss(net, chunk, generator)
                    if value is None:
                        return {}
                    total += float(value) * len(next(iter(chunk.values())))
        finally:
            net.train(was_training)
        out[name] = total / rows
    return out
