"""Registry: spec -> JSON -> model round-trips, clear errors, extra kinds."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.dit import DiT, DiTConfig, dit_config
from models.registry import build_model, model_spec, register_kind, registered_kinds
from models.vae import VAE, VAEConfig


def _through_json(spec: dict) -> dict:
    return json.loads(json.dumps(spec))


def _randomize(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _assert_same_architecture(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(sa[k].shape == sb[k].shape for k in sa)


def test_dit_round_trip():
    model = DiT(dit_config("DiT-T/2", input_size=8, in_channels=4, depth=2, num_classes=5))
    _randomize(model, 0)  # so the output is not the AdaLN-Zero zero
    spec = _through_json(model_spec(model))
    assert spec["kind"] == "dit"
    rebuilt = build_model(spec)
    assert isinstance(rebuilt, DiT) and rebuilt.config == model.config
    _assert_same_architecture(model, rebuilt)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(3, 4, 8, 8)
    t = torch.rand(3)
    y = torch.tensor([0, 4, 5])  # 5 is the null label
    with torch.no_grad():
        expected = model.eval()(x, t, y)
        assert expected.abs().sum() > 0
        assert torch.equal(rebuilt.eval()(x, t, y), expected)


def test_vae_round_trip():
    model = VAE(VAEConfig(in_channels=3, base_channels=8, downsample=8))
    spec = _through_json(model_spec(model))
    assert spec == {
        "kind": "vae",
        "config": {
            "in_channels": 3,
            "latent_channels": 4,
            "base_channels": 8,
            "downsample": 8,
            "beta": 1e-4,
        },
    }
    rebuilt = build_model(spec)
    _assert_same_architecture(model, rebuilt)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(rebuilt.encode(x).mean, model.encode(x).mean)
        z = model.encode(x).mean
        assert torch.equal(rebuilt.decode(z), model.decode(z))


def test_errors_name_what_is_wrong_and_what_is_valid():
    with pytest.raises(ValueError, match=r"'mystery'.*'dit'.*'vae'"):
        build_model({"kind": "mystery", "config": {}})
    spec = model_spec(VAE(VAEConfig(base_channels=8)))
    spec["config"]["widht"] = 3
    with pytest.raises(ValueError, match=r"\['widht'\].*base_channels"):
        build_model(spec)
    with pytest.raises(ValueError, match=r"\['depth', 'hidden_size', 'num_heads'\]"):
        build_model({"kind": "dit", "config": {"input_size": 8}})
    with pytest.raises(ValueError, match="kind"):
        build_model({"config": {}})
    with pytest.raises(ValueError, match=r"Linear is not a registered model kind"):
        model_spec(nn.Linear(2, 2))


@dataclass(frozen=True)
class _ClassifierConfig:
    in_features: int = 4
    num_classes: int = 3
    widths: tuple[int, ...] = (8, 8)


class _Classifier(nn.Module):
    def __init__(self, config: _ClassifierConfig):  # keeps no .config: the registry adds it
        super().__init__()
        dims = [config.in_features, *config.widths, config.num_classes]
        self.net = nn.Sequential(*(nn.Linear(a, b) for a, b in zip(dims, dims[1:])))

    def forward(self, x):
        return self.net(x)


def test_register_kind_adds_a_buildable_kind():
    register_kind("test-classifier", _ClassifierConfig, _Classifier)
    register_kind("test-classifier", _ClassifierConfig, _Classifier)  # same pair: no-op
    assert "test-classifier" in registered_kinds()
    model = build_model({"kind": "test-classifier", "config": {"widths": [16]}})
    assert model.config == _ClassifierConfig(widths=(16,))  # JSON list back to a tuple
    spec = _through_json(model_spec(model))
    assert spec == {"kind": "test-classifier", "config": {"in_features": 4, "num_classes": 3, "widths": [16]}}
    _assert_same_architecture(model, build_model(spec))
    with pytest.raises(ValueError, match="already registered"):
        register_kind("test-classifier", VAEConfig, VAE)
    with pytest.raises(ValueError, match="dataclass"):
        register_kind("bad", dict, VAE)


def test_built_modules_keep_their_config():
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=4)
    assert (
        build_model({"kind": "dit", "config": {"input_size": 8, "hidden_size": 32, "depth": 1, "num_heads": 4}}).config
        == cfg
    )
