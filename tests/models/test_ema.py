"""EMA: decay 0 copies, decay 1 keeps, decay d matches the hand formula; buffers copied."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.ema import ema_copy, ema_decay, ema_update


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _params(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.named_parameters()}


def test_decay_zero_copies():
    target, source = _net(0), _net(1)
    ema_update(target, source, 0.0)
    for (name, a), b in zip(target.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name


def test_decay_one_keeps():
    target, source = _net(0), _net(1)
    before = _params(target)
    ema_update(target, source, 1.0)
    for name, p in target.named_parameters():
        assert torch.equal(p, before[name]), name


def test_decay_matches_hand_formula():
    target, source = _net(0), _net(1)
    with torch.no_grad():
        source[1].running_mean.fill_(0.7)  # a buffer that differs
    old, new = _params(target), _params(source)
    d = 0.9
    ema_update(target, source, d)
    for name, p in target.named_parameters():
        assert torch.allclose(p, d * old[name] + (1 - d) * new[name], atol=1e-7), name
    # buffers are copied, not averaged
    assert torch.equal(target[1].running_mean, torch.full((4,), 0.7))


def test_update_leaves_no_graph_and_source_untouched():
    target, source = _net(0), _net(1)
    before = _params(source)
    ema_update(target, source, 0.5)
    assert all(p.grad is None for p in target.parameters())
    for name, p in source.named_parameters():
        assert torch.equal(p, before[name])


def test_mismatched_modules_name_the_fix():
    target = _net(0)
    wrapped = nn.Module()
    wrapped.module = _net(1)  # what a DDP wrapper looks like from the outside
    with pytest.raises(ValueError, match=r"module\.0\.weight.*ddp_model\.module"):
        ema_update(target, wrapped, 0.9)
    with pytest.raises(ValueError, match="decay=1.5"):
        ema_update(target, _net(1), 1.5)


def test_ema_copy_is_frozen_and_independent():
    model = _net(0)
    ema = ema_copy(model)
    assert not ema.training
    assert all(not p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema[0].weight, model[0].weight)


def test_ema_decay_warmup():
    assert ema_decay(0, 0.999, 0) == 0.999
    assert ema_decay(0, 0.999, 10) == pytest.approx(1 / 10)
    assert ema_decay(10, 0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(100_000, 0.999, 10) == 0.999
    steps = [ema_decay(s, 0.9999, 10) for s in range(0, 1000, 50)]
    assert steps == sorted(steps)  # rises monotonically towards the target decay
    with pytest.raises(ValueError, match="decay=-0.1"):
        ema_decay(0, -0.1)
