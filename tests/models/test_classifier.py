"""The evaluation classifier (models/classifier.py) and feature extractors (models/extractors.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.classifier import Classifier, ClassifierConfig, ClassifierObjective, random_shift, train_classifier
from models.extractors import (
    FeatureExtractor,
    classifier_extractor,
    extract_features,
    load_torchscript_extractor,
)
from models.metrics import class_accuracy
from models.registry import build_model, model_spec


def digits_16(n_train: int = 1400):
    """sklearn's 8x8 digits, bilinearly upsampled to (N, 1, 16, 16) in [-1, 1], split in two."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16 * 2 - 1  # (N, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)  # (N, 1, 16, 16)
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = order[:n_train], order[n_train:]
    return x[train], y[train], x[test], y[test]


# ---- the classifier ------------------------------------------------------------------------


def test_classifier_shapes_and_features_feed_the_head():
    model = Classifier(ClassifierConfig(in_channels=3, image_size=8, num_classes=5, width=8, feature_dim=12))
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    features = model.features(x)
    assert features.shape == (4, 12)
    assert model(x).shape == (4, 5)
    torch.testing.assert_close(model.head(features), model(x))


def test_classifier_rejects_images_of_the_wrong_shape():
    model = Classifier(ClassifierConfig())
    with pytest.raises(ValueError, match=r"\(N, 1, 16, 16\)"):
        model(torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("bad", [dict(image_size=10), dict(num_classes=0), dict(width=0)])
def test_classifier_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        ClassifierConfig(**bad)


def test_classifier_is_a_registered_kind():
    model = Classifier(ClassifierConfig(width=8, feature_dim=16))
    spec = model_spec(model)
    assert spec == {
        "kind": "classifier",
        "config": {"in_channels": 1, "image_size": 16, "num_classes": 10, "width": 8, "feature_dim": 16},
    }
    rebuilt = build_model(spec)
    assert isinstance(rebuilt, Classifier) and rebuilt.config == model.config


def test_random_shift_translates_each_image_within_the_limit():
    x = torch.full((64, 2, 9, 9), -1.0)
    x[:, :, 4, 4] = 1.0  # one bright pixel in the centre, both channels
    shifted = random_shift(x, max_shift=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    bright = (shifted == 1.0).nonzero()  # (64 * 2, 4): one pixel per image and channel
    assert bright.shape[0] == 64 * 2
    assert (bright[:, 2:] - 4).abs().max() <= 2
    assert len({tuple(p) for p in bright[:, 2:].tolist()}) > 5  # shifts actually vary
    assert torch.equal(bright[0::2, 2:], bright[1::2, 2:])  # channels move together
    assert torch.equal(random_shift(x, 0), x)


def test_train_classifier_is_reproducible_and_reduces_the_loss():
    x, y, _, _ = digits_16()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the initial weights
        model = Classifier(ClassifierConfig(width=8, feature_dim=16))
        runs.append(
            train_classifier(model, x, y, steps=20, batch_size=32, lr=3e-3, generator=torch.Generator().manual_seed(1))
        )
    assert runs[0] == runs[1]
    assert len(runs[0]) == 20
    assert sum(runs[0][-5:]) < sum(runs[0][:5])
    assert not model.training


def test_train_classifier_rejects_out_of_range_labels():
    model = Classifier(ClassifierConfig(num_classes=3, width=8))
    with pytest.raises(ValueError, match="num_classes"):
        train_classifier(model, torch.zeros(4, 1, 16, 16), torch.tensor([0, 1, 2, 3]), steps=1, batch_size=2, lr=1e-3)


def test_classifier_learns_sklearn_digits():
    x_train, y_train, x_test, y_test = digits_16()
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(width=16, feature_dim=64))
    train_classifier(
        model, x_train, y_train, steps=150, batch_size=64, lr=3e-3, generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        accuracy = class_accuracy(model(x_test), y_test)
    assert accuracy > 0.9, f"test accuracy {accuracy:.3f} on {len(y_test)} held-out digits"


# ---- extractors ------------------------------------------------------------------------------


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 5, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3), keepdim=True)  # (N, 5, 1, 1): flattened by the wrapper


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_extractor_round_trips_through_a_file(tmp_path):
    torch.manual_seed(0)
    module = TinyEncoder().eval()
    path = tmp_path / "encoder.pt"
    torch.jit.save(torch.jit.script(module), str(path))
    images = torch.rand(10, 1, 16, 16) * 2 - 1

    with open(path, "rb") as file:
        from_file = load_torchscript_extractor(file, name="tiny")
    from_bytes = load_torchscript_extractor(path.read_bytes())

    assert isinstance(from_file, FeatureExtractor) and from_file.name == "tiny"
    features = extract_features(from_file, images, batch_size=3)
    assert features.shape == (10, 5) and features.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(features, module(images).flatten(1))
    torch.testing.assert_close(extract_features(from_bytes, images), features)


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torchscript_extractor_explains_unreadable_input():
    with pytest.raises(ValueError, match="torch.jit.save"):
        load_torchscript_extractor(b"not a torchscript archive")
    with pytest.raises(TypeError, match="read_bytes"):
        load_torchscript_extractor("/some/path.pt")


def test_classifier_extractor_returns_the_penultimate_layer():
    model = Classifier(ClassifierConfig(width=8, feature_dim=16)).eval()
    images = torch.rand(7, 1, 16, 16) * 2 - 1
    features = extract_features(classifier_extractor(model), images, batch_size=4)
    with torch.no_grad():
        torch.testing.assert_close(features, model.features(images))


def test_extractor_rejects_outputs_without_one_row_per_image():
    extractor = FeatureExtractor(nn.Flatten(0), name="bad")  # (N, ...) -> one long vector
    with pytest.raises(ValueError, match="one row per image"):
        extractor(torch.zeros(3, 1, 4, 4))


# ---- the classifier objective (fewstep's one training loop) ----------------------------------


def test_classifier_objective_without_shift_is_plain_cross_entropy():
    model = Classifier(ClassifierConfig(width=8, feature_dim=16))
    x, y = torch.rand(6, 1, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 3, 4, 5])
    out = ClassifierObjective(max_shift=0).loss(model, {"x_1": x, "y": y})
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y))
    assert set(out.logs) == {"loss", "accuracy"}
    assert float(out.logs["accuracy"]) == pytest.approx(class_accuracy(model(x), y))
    assert not out.logs["loss"].requires_grad


def test_classifier_objective_shifts_with_the_global_rng():
    model = Classifier(ClassifierConfig(width=8, feature_dim=16))
    x, y = torch.rand(16, 1, 16, 16) * 2 - 1, torch.randint(0, 10, (16,))
    objective = ClassifierObjective(max_shift=2)
    torch.manual_seed(0)
    a = objective.loss(model, {"x_1": x, "y": y}).logs["loss"]
    torch.manual_seed(0)
    b = objective.loss(model, {"x_1": x, "y": y}).logs["loss"]
    c = objective.loss(model, {"x_1": x, "y": y}).logs["loss"]
    assert float(a) == float(b) and float(a) != float(c)
    assert float(a) != float(ClassifierObjective(max_shift=0).loss(model, {"x_1": x, "y": y}).logs["loss"])


def test_classifier_objective_trains_in_a_plain_loop(one_thread):
    x_train, y_train, _, _ = digits_16()
    torch.manual_seed(0)
    model = Classifier(ClassifierConfig(width=8, feature_dim=16))
    objective = ClassifierObjective(max_shift=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        index = torch.randint(0, len(y_train), (32,))
        out = objective.loss(model, {"x_1": x_train[index], "y": y_train[index]})
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.logs["loss"])
    first, last = torch.stack(losses[:10]).mean(), torch.stack(losses[-10:]).mean()
    assert last < 0.5 * first, (float(first), float(last))


def test_classifier_objective_names_missing_keys_and_bad_shifts():
    model = Classifier(ClassifierConfig(width=8))
    with pytest.raises(KeyError, match="'y'"):
        ClassifierObjective().loss(model, {"x_1": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match="max_shift"):
        ClassifierObjective(max_shift=-1)
