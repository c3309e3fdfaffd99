"""Inception-v3 in plain torch (models/inception.py) and its extractor, against torchvision's layout.

Fixtures, both made from torchvision 0.28.0's own source (torchvision/models/inception.py
from its wheel, executed with its package imports stubbed):
- inception_v3_state_dict.json: every state-dict key of ``inception_v3(aux_logits=True)``
  with its shape and dtype, in order;
- inception_v3_reference_features.json: torchvision's pool features (every 64th of 2048,
  and each row's mean and norm) for the state dict and images ``seeded_state_dict`` and
  ``seeded_images`` below make, for the ImageNet and the TF-FID pooling variants.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from models.extractors import INCEPTION_SIZE, extract_features, load_inception_extractor
from models.inception import Inception3, InceptionConfig, config_for_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

HERE = Path(__file__).resolve().parent
TABLE = [tuple(entry) for entry in json.loads((HERE / "inception_v3_state_dict.json").read_text())]


def seeded_state_dict(seed: int, num_classes: int = 1000, aux: bool = True) -> dict[str, torch.Tensor]:
    """A random torchvision-shaped state dict with He-scaled convs and non-trivial BN statistics,
    so activations keep a sensible scale through all 94 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, dtype in TABLE:
        if not aux and key.startswith("AuxLogits."):
            continue
        if key in ("fc.weight", "fc.bias", "AuxLogits.fc.weight", "AuxLogits.fc.bias"):
            shape = [num_classes, *shape[1:]]
        if dtype == "int64":
            state[key] = torch.tensor(0)
        elif key.endswith("conv.weight") or key.endswith("fc.weight"):
            fan_in = math.prod(shape[1:])
            state[key] = torch.randn(shape, generator=g) * (2.0 / fan_in) ** 0.5
        elif key.endswith("running_var"):
            state[key] = 0.5 + torch.rand(shape, generator=g)
        elif key.endswith("bn.weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:  # bn.bias, running_mean, fc.bias
            state[key] = 0.1 * torch.randn(shape, generator=g)
    return state


def seeded_images(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, generator=g) * 2 - 1  # (2, 3, 299, 299)


def saved(state: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def test_state_dict_keys_shapes_and_order_equal_torchvisions():
    ours = [
        (k, list(v.shape), str(v.dtype).removeprefix("torch."))
        for k, v in Inception3(InceptionConfig()).state_dict().items()
    ]
    assert ours == TABLE
    without_aux = Inception3(InceptionConfig(aux_logits=False)).state_dict()
    assert list(without_aux) == [k for k, _, _ in TABLE if not k.startswith("AuxLogits.")]


@pytest.mark.parametrize("variant", ["imagenet", "tf_fid"])
def test_pool_features_equal_torchvisions_on_a_seeded_state_dict(variant):
    reference = json.loads((HERE / "inception_v3_reference_features.json").read_text())[variant]
    num_classes = 1008 if variant == "tf_fid" else 1000
    state = seeded_state_dict(reference["seed"], num_classes=num_classes, aux=variant == "imagenet")
    config = config_for_state_dict(state)
    assert config.tf_pooling == (variant == "tf_fid") and config.aux_logits == (variant == "imagenet")
    net = Inception3(config).eval()
    net.load_state_dict(state)
    with torch.no_grad():
        features = net.features(seeded_images(reference["image_seed"]))  # (2, 2048)
    expected = torch.tensor(reference["every_64th"])
    torch.testing.assert_close(features[:, ::64], expected, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(features.mean(1), torch.tensor(reference["mean"]), rtol=2e-4, atol=1e-6)
    torch.testing.assert_close(features.norm(dim=1), torch.tensor(reference["norm"]), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("aux", [True, False])
def test_the_extractor_loads_torchvision_state_dicts_with_or_without_the_aux_head(aux):
    extractor = load_inception_extractor(saved(seeded_state_dict(1, aux=aux)))
    assert extractor.name == "inception_v3"
    assert (extractor.net.inception.AuxLogits is not None) == aux
    features = extract_features(extractor, torch.rand(3, 1, 16, 16) * 2 - 1, batch_size=2)  # grey 16x16 in
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and features.std() > 0


def test_the_extractor_resizes_to_299_and_feeds_what_transform_input_would():
    # torchvision's recipe: x01 in [0, 1] -> ImageNet normalisation -> transform_input -> net.
    # fewstep's: x in [-1, 1] -> bilinear resize to 299 -> net. Both must give the same features.
    state = seeded_state_dict(2)
    extractor = load_inception_extractor(saved(state))
    recipe = Inception3(InceptionConfig(transform_input=True)).eval()
    recipe.load_state_dict(state)
    x = torch.rand(2, 3, 40, 40) * 2 - 1
    x01 = F.interpolate((x + 1) / 2, size=(299, 299), mode="bilinear", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    with torch.no_grad():
        expected = recipe.features((x01 - mean) / std)
        torch.testing.assert_close(recipe.transform_input((x01 - mean) / std), x01 * 2 - 1, rtol=0, atol=1e-6)
    torch.testing.assert_close(extract_features(extractor, x), expected, rtol=1e-4, atol=1e-5)


def test_the_tf_fid_weights_load_with_tf_pooling():
    extractor = load_inception_extractor(saved(seeded_state_dict(3, num_classes=1008, aux=False)))
    assert extractor.net.inception.config == InceptionConfig(num_classes=1008, aux_logits=False, tf_pooling=True)
    assert extractor.name == "inception_v3_tf"


def test_the_loader_explains_what_is_wrong():
    with pytest.raises(ValueError, match="fc.weight"):
        load_inception_extractor(saved({"conv.weight": torch.zeros(3)}))
    bad = seeded_state_dict(4)
    bad["Mixed_5b.branch1x1.conv.weight"] = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="Mixed_5b.branch1x1"):
        load_inception_extractor(saved(bad))
    with pytest.raises(ValueError, match="state dict"):
        load_inception_extractor(saved([torch.zeros(2)]))
    with pytest.raises(ValueError, match="could not read"):
        load_inception_extractor(b"")
    with pytest.raises(TypeError, match="read_bytes"):
        load_inception_extractor("/some/inception.pt")
    with pytest.raises(ValueError, match="75x75"):
        Inception3(InceptionConfig()).features(torch.zeros(1, 3, 32, 32))
