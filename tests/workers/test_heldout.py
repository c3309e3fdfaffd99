"""The held-out loss (fixed noise, times and correct labels) and reading a training curve back."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from flows.cli.run import training_notes
from infra.cards import LatentsCard
from infra.store import Store
from infra.tables import tensors_to_table
from models.diffusion import DDPMObjective, vp_schedule
from models.objectives import FlowMatching
from models.paths import LogitNormalTime
from workers.curves import curve_markdown, still_falling
from workers.evaluation.report import curves_section
from workers.heldout import HELDOUT_SEED, HeldOut, heldout_losses, heldout_set

SHAPE = (2, 4, 4)


class LabelNet(nn.Module):
    """v(x, t, y) = x / 2 + t + e_y: its output depends on the label (3 classes, null id 3)."""

    num_classes = 3

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 1)
        with torch.no_grad():
            self.embed.weight.copy_(torch.tensor([[-2.0], [0.5], [3.0], [0.0]]))

    def forward(self, x, t, y):
        return 0.5 * x + t.view(-1, 1, 1, 1) + self.embed(y).view(-1, 1, 1, 1)


def batch(n: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"x_1": torch.randn((n, *SHAPE), generator=g), "y": torch.arange(n) % 3}


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize(
    "make",
    [lambda p: FlowMatching(LogitNormalTime(), label_dropout=p), lambda p: DDPMObjective(vp_schedule("linear", 50), p)],
)
def test_heldout_loss_is_deterministic_and_keeps_every_label(make):
    net, data = LabelNet(), batch()
    objective = make(0.99)
    first = objective.heldout_loss(net, data, seeded(7))
    assert torch.equal(first, objective.heldout_loss(net, data, seeded(7)))  # same draws -> same value
    assert not torch.equal(first, objective.heldout_loss(net, data, seeded(8)))  # the draws come from the generator
    # Dropout 0.99 in training, none held out: the same value as the all-correct-label objective ...
    torch.testing.assert_close(first, make(0.0).heldout_loss(net, data, seeded(7)), rtol=0, atol=0)
    # ... which the label changes (so the equality above is not vacuous).
    null = {**data, "y": torch.full_like(data["y"], 3)}
    assert not torch.allclose(first, objective.heldout_loss(net, null, seeded(7)))


def test_heldout_losses_score_each_net_on_the_same_draws_and_restore_its_mode():
    net, other = LabelNet().train(), LabelNet().eval()
    with torch.no_grad():
        other.embed.weight.mul_(2)
    heldout = HeldOut(batch(600), "test")  # more than one chunk
    objective = FlowMatching(label_dropout=0.5)
    losses = heldout_losses(objective, {"ema": other, "raw": net}, heldout, torch.device("cpu"))
    assert losses == heldout_losses(objective, {"ema": other, "raw": net}, heldout, torch.device("cpu"))
    assert set(losses) == {"ema", "raw"} and losses["ema"] != losses["raw"]
    assert net.training and not other.training
    # One chunk: exactly the objective's held-out loss with the fixed seed, computed without a graph.
    small = HeldOut(batch(100), "test")
    with torch.no_grad():
        whole = objective.heldout_loss(net.eval(), small.batch, seeded(HELDOUT_SEED))
    assert heldout_losses(objective, {"raw": net}, small, torch.device("cpu"))["raw"] == pytest.approx(float(whole))


def commit_latents(store: Store, n_train: int, n_test: int):
    n = n_train + n_test
    splits = np.array(["train", "test"] * n_test + ["train"] * (n_train - n_test))
    mean = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, *SHAPE), np.float32)
    table = tensors_to_table(
        {
            "id": np.arange(n),
            "split": splits,
            "label": np.where(np.arange(n) == 1, -1, np.arange(n) % 3),  # row 1 unlabelled
            "mean": mean,
            "logvar": np.zeros((n, *SHAPE), np.float32),
        }
    )
    with store.begin("latents", f"t{n_test}", config={"n": n}) as writer:
        writer.write_table("latents", table)
        card = LatentsCard(
            latent_shape=SHAPE,
            num_classes=3,
            latent_scale=2.0,
            vae_ref="vae/none",
            n_latents=n,
            n_train=n_train,
            n_test=n_test,
            dtype="float32",
        )
        return writer.commit(metrics=card.to_metrics())


def test_the_heldout_set_is_the_first_test_rows_scaled_with_null_for_unlabelled(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    heldout = heldout_set(store, commit_latents(store, n_train=20, n_test=6), rows=4)
    assert heldout.rows == 4 and "4 test latents" in heldout.description
    # Test rows are the odd ids 1, 3, 5, 7; x_1 = mean * scale; id 1 is unlabelled -> null id 3.
    assert heldout.batch["x_1"][:, 0, 0, 0].tolist() == [2.0, 6.0, 10.0, 14.0]
    assert heldout.batch["y"].tolist() == [3, 0, 2, 1]
    assert heldout_set(store, commit_latents(store, n_train=20, n_test=0), rows=4) is None
    assert heldout_set(store, commit_latents(store, n_train=20, n_test=6), rows=0) is None


def curve(values: list[float], every: int = 500) -> list[dict]:
    out = []
    for i, value in enumerate(values, start=1):
        out.append({"step": i * every - 250, "loss": 1.0})  # log entries between checkpoints
        out.append({"step": i * every, "loss": 1.0, "heldout_loss": value, "heldout_loss_raw": value + 0.01})
    return out


def test_still_falling_speaks_only_for_a_curve_still_falling_steeply():
    note = still_falling(curve([1.2, 1.0, 0.9, 0.86, 0.82, 0.78]), "base")
    assert note == (
        "base: held-out loss still falling (0.86 -> 0.78 over the last 1000 steps, -9.3 %): more base.steps would help"
    )
    # The window: from the last checkpoint at or before 75 % of the steps (3,000 -> 2,000; 2,500 -> 1,500).
    assert "(0.9 -> 0.82 over the last 1000 steps" in still_falling(curve([1.2, 1.0, 0.9, 0.86, 0.82]), "base")
    assert still_falling(curve([1.2, 1.0, 0.9, 0.80, 0.799, 0.798]), "base") is None  # flat at the end
    assert still_falling(curve([0.9, 0.8, 0.82, 0.85]), "base") is None  # rising (over-fitting is not "more steps")
    assert still_falling(curve([1.2, 0.8]), "base") is None  # too short to say
    assert still_falling([{"step": s, "loss": 2.0 / s} for s in range(1, 100)], "base") is None  # no held-out loss


def test_the_curve_tables_show_both_losses_and_the_note():
    lines = "\n".join(curve_markdown("base", curve([1.2, 1.0, 0.9, 0.86, 0.82, 0.78]), "512 test latents", "base"))
    assert "| 3000 | 1 | 0.78 | 0.79 |" in lines and "| 2750 |" not in lines  # checkpoint rows only
    assert "512 test latents" in lines and "more base.steps would help" in lines
    section = "\n".join(curves_section({"reflow-1": {"curve": curve([1.0, 0.99, 0.99]), "stage": "reflow"}}))
    assert "## Training curves" in section and "| 1500 | 1 | 0.99 | 1 |" in section
    assert "still falling" not in section


def test_the_run_summary_notes_each_generator_still_falling(tmp_path):
    store = Store.open(str(tmp_path / "store"))
    refs = {}
    for name, stage, values in (("base", "base", [1.2, 1.0, 0.9, 0.8]), ("reflow_1", "reflow", [0.5, 0.5, 0.5, 0.5])):
        with store.begin(stage, name, config={}) as writer:
            writer.write_json("curve", {"curve": curve(values), "resumed_from": 0, "heldout": "x"})
            refs[name] = writer.commit(metrics={}).ref
    notes = training_notes(store, refs)
    assert notes == [
        "",
        "  note: base: held-out loss still falling (0.9 -> 0.8 over the last 500 steps, -11.1 %): "
        "more base.steps would help",
    ]
