"""U-Net: the DiT's interface (shapes, zero start, conditioning, registry, guided sampling)."""

from __future__ import annotations

import pytest
import torch

from models.registry import build_model, model_spec
from models.samplers import sample_ode
from models.unet import UNet, UNetConfig


def _small(**overrides) -> UNetConfig:
    return UNetConfig(**{"base_channels": 16, "num_classes": 5, **overrides})


def _inputs(cfg: UNetConfig, n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t = torch.rand(n, generator=g)
    y = torch.randint(0, cfg.num_classes + 1, (n,), generator=g)  # includes the null id
    return x, t, y


@pytest.mark.parametrize("size, attention", [(4, True), (8, True), (8, False), (16, True)])
def test_fresh_unet_outputs_exactly_zero_in_the_input_shape(size, attention):
    cfg = _small(input_size=size, attention=attention)
    model = UNet(cfg)
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        for mode in (True, False):
            out = model.train(mode)(x, t, y)
            assert out.shape == x.shape
            assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("size", [8, 16])
def test_output_shape_equals_input_shape_once_trained(size):
    # Three levels on 16x16 (16 -> 8 -> 4), two on 8x8; random weights everywhere so
    # every skip connection and up/down sample is exercised.
    cfg = _small(input_size=size, channel_mults=(1, 2, 2) if size == 16 else (1, 2))
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = _inputs(cfg, n=2)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert out.abs().sum() > 0


def test_label_reaches_the_output_after_training_steps():
    # Step 1 moves only the zero output conv (nothing behind it sees a gradient yet, as with
    # AdaLN-Zero); step 2 moves each residual branch's zero conv, behind which AdaGN reads c.
    torch.manual_seed(0)
    cfg = _small()
    model = UNet(cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, _ = _inputs(cfg, n=4)
    y = torch.tensor([0, 1, 2, 3])
    target = torch.randn_like(x)
    for _ in range(2):
        loss = (model(x, t, y) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        a = model(x[:1], t[:1], torch.tensor([0]))
        b = model(x[:1], t[:1], torch.tensor([3]))
        null = model(x[:1], t[:1], torch.tensor([cfg.num_classes]))
    assert a.abs().sum() > 0
    assert not torch.allclose(a, b)
    assert not torch.allclose(a, null)


def test_time_reaches_the_output():
    cfg = _small()
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, _, y = _inputs(cfg, n=1)
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.tensor([0.1]), y), model(x, torch.tensor([0.9]), y))


def test_registry_round_trip():
    model = UNet(_small(channel_mults=(1, 2), blocks_per_level=1, attention=True))
    spec = model_spec(model)
    assert spec["kind"] == "unet"
    assert spec["config"]["channel_mults"] == (1, 2)
    spec["config"]["channel_mults"] = list(spec["config"]["channel_mults"])  # what JSON gives back
    rebuilt = build_model(spec)
    assert isinstance(rebuilt, UNet) and rebuilt.config == model.config
    a, b = model.state_dict(), rebuilt.state_dict()
    assert list(a) == list(b)
    assert all(a[k].shape == b[k].shape for k in a)
    rebuilt.load_state_dict(a)
    cfg = model.config
    x, t, y = _inputs(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        rebuilt.load_state_dict(model.state_dict())
        assert torch.equal(rebuilt.eval()(x, t, y), model.eval()(x, t, y))


def test_sample_ode_with_guidance():
    torch.manual_seed(0)
    cfg = _small()
    model = UNet(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x0 = torch.randn(3, cfg.in_channels, cfg.input_size, cfg.input_size)
    y = torch.tensor([0, 1, 2])
    guided = sample_ode(model, x0, y, steps=4, guidance=2.0)
    plain = sample_ode(model, x0, y, steps=4, guidance=1.0)
    assert guided.x_1.shape == x0.shape and torch.isfinite(guided.x_1).all()
    assert not torch.allclose(guided.x_1, plain.x_1)  # the null pass was used


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(input_size=6, channel_mults=(1, 2, 2)), "not divisible by 4"),
        (dict(channel_mults=()), "channel_mults"),
        (dict(base_channels=0), "positive"),
        (dict(dropout=1.0), "dropout"),
    ],
)
def test_bad_config_names_the_problem(overrides, match):
    with pytest.raises(ValueError, match=match):
        _small(**overrides)


def test_wrong_input_shape_is_explained():
    model = UNet(_small())
    with pytest.raises(ValueError, match="input_size"):
        model(torch.zeros(1, 4, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))
