"""What a training checkpoint holds: packed by the worker, restored on resume, read back by fit."""

from __future__ import annotations

import torch
from torch import nn

from infra.checkpoints import Checkpoint
from infra.store import Store
from workers.train_state import LoopState, pack, restore, weights


def modules(seed: int):
    torch.manual_seed(seed)
    model, ema, target = nn.Linear(3, 2), nn.Linear(3, 2), nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()  # AdamW now holds moments and a step count
    return model, ema, {"target": target}, optimizer


def test_a_packed_checkpoint_restores_every_module_the_optimizer_and_the_rng(tmp_path):
    model, ema, extra, optimizer = modules(0)
    state = LoopState(step=7, epoch=2, position=3, curve=[{"step": 5, "loss": 0.5}], resumed_from=4, nodes=["n"])
    checkpoints = Store.open(str(tmp_path / "store")).checkpoints("unit", "k")
    checkpoints.save(state.step, pack(model, ema, extra, optimizer), state.to_json())
    expected_draw = torch.rand(3)  # the RNG stream right after packing

    latest = checkpoints.latest()
    fresh_model, fresh_ema, fresh_extra, fresh_optimizer = modules(1)
    restore(latest, fresh_model, fresh_ema, fresh_extra, fresh_optimizer)
    for a, b in ((model, fresh_model), (ema, fresh_ema), (extra["target"], fresh_extra["target"])):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    moments, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    assert moments.keys() == restored.keys()
    for index in moments:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(torch.as_tensor(moments[index][name]), torch.as_tensor(restored[index][name]))
    torch.testing.assert_close(torch.rand(3), expected_draw)  # rank 0's stream goes on where it was saved

    assert LoopState.of(latest) == state
    raw, averaged = weights(latest)
    assert raw.keys() == model.state_dict().keys() and averaged.keys() == ema.state_dict().keys()


def test_a_state_without_later_fields_reads_with_their_defaults():
    old = Checkpoint(step=3, tensors={}, state={"curve": [], "resumed_from": 0, "epoch": 1, "position": 2})
    assert LoopState.of(old) == LoopState(step=3, epoch=1, position=2)
