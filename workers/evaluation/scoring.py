"""The evaluation's feature space: images -> features (FID, KID, precision, recall) and class logits.

A feature space is the features stage's network (a classifier's penultimate layer, or a
self-supervised encoder's features; the default), or a local file the user names
(``evaluate.extractor``: a TorchScript module or Inception-v3 weights). :class:`ExtractorSource`
says which, resolved once on the driver; every Ray task rebuilds the same :class:`Scorer` from
it. Class logits (for class accuracy) come from the features stage's network when it is a
classifier, whatever the feature space.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from infra.cards import FeaturesCard
from infra.config import ConfigError, EvaluateConfig
from infra.manifest import sha256_hex
from infra.store import Manifest, Store
from models.classifier import Classifier
from models.extractors import (
    classifier_extractor,
    encoder_extractor,
    extract_features,
    load_inception_extractor,
    load_torchscript_extractor,
)
from workers.pixels import to_model_range

SCORE_BATCH = 512
FEATURES = "features"  # the network's file name in a features manifest

# A features card's kind -> the extractor of its network.
EXTRACTORS = {"classifier": classifier_extractor, "encoder": encoder_extractor}


def load_features(store: Store, features: Manifest) -> tuple[FeaturesCard, nn.Module]:
    """The features stage's card and network (classifier or encoder), in eval mode."""
    return FeaturesCard.from_manifest(features), store.load_model(features, FEATURES).eval()


@torch.no_grad()
def logits_of(classifier: Classifier, x: torch.Tensor, batch: int = SCORE_BATCH) -> torch.Tensor:
    """Class logits (N, K) of images (N, C, H, W) in [-1, 1], in batches, on the classifier's device."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)])


def accuracy(classifier: Classifier, pixels: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of labelled images (0 <= y < K) the classifier gets right; None when there are none."""
    keep = (labels >= 0) & (labels < classifier.num_classes)
    if not keep.any():
        return None
    logits = logits_of(classifier, torch.from_numpy(to_model_range(pixels[keep])))
    return float((logits.argmax(1).numpy() == labels[keep]).mean())


@dataclass(frozen=True)
class ExtractorSource:
    """How a task rebuilds the feature extractor: the features stage's network, or a user file's bytes."""

    kind: str  # "features" | "torchscript" | "inception"
    name: str  # what the table's extractor column says
    data: Any = None  # bytes, or a Ray ObjectRef to them, for user files
    sha256: str | None = None


def extractor_source(config: EvaluateConfig, features: Manifest | None) -> ExtractorSource:
    """Resolve ``evaluate.extractor`` on the driver: read the local file once, name it by its digest."""
    if config.extractor is None:
        if features is None:
            raise ConfigError(
                "evaluate needs a feature space: pass the features stage's manifest, or set "
                "evaluate.extractor to a local TorchScript or Inception-v3 file"
            )
        return ExtractorSource(FEATURES, features.ref)
    path = Path(config.extractor).expanduser()
    if "://" in config.extractor or not path.is_file():
        raise ConfigError(
            f"evaluate.extractor={config.extractor!r} is not a local file; give the path of a "
            "TorchScript module (torch.jit.save) or of Inception-v3 weights (extractor_kind: inception). "
            "Nothing is downloaded"
        )
    data = path.read_bytes()
    digest = sha256_hex(data)
    label = "inception_v3" if config.extractor_kind == "inception" else f"torchscript:{path.name}"
    return ExtractorSource(config.extractor_kind, f"{label}@{digest[:12]}", data, digest)


@dataclass(frozen=True)
class Scored:
    features: np.ndarray  # (N, D) float32
    logits: np.ndarray | None  # (N, K) or None without a classifier
    labels: np.ndarray  # (N,) int64; -1 or >= K: no class


class Scorer:
    """Images -> features (for FID, precision, recall) and class logits (for class accuracy)."""

    def __init__(self, extractor: nn.Module, classifier: Classifier | None, device: torch.device):
        self.device = device
        self.extractor = extractor.to(device).eval()
        self.classifier = classifier.to(device).eval() if classifier is not None else None

    @classmethod
    def load(cls, store: Store, source: ExtractorSource, features_ref: str | None, device: str) -> Scorer:
        import ray

        device = torch.device(device)
        card, network = load_features(store, store.get_ref(features_ref)) if features_ref else (None, None)
        classifier = network if card is not None and card.classifies else None
        if source.kind == FEATURES:
            extractor = EXTRACTORS[card.kind](network, name=source.name)
        else:
            data = ray.get(source.data) if isinstance(source.data, ray.ObjectRef) else source.data
            if source.kind == "inception":
                extractor = load_inception_extractor(data, map_location=device)
            else:
                extractor = load_torchscript_extractor(data, name=source.name, map_location=device)
        return cls(extractor, classifier, device)

    @torch.no_grad()
    def score(self, pixels: np.ndarray, labels: np.ndarray) -> Scored:
        """uint8 (N, H, W, C) and the class each image is (or was asked to be) -> features, logits."""
        x = torch.from_numpy(to_model_range(pixels)).to(self.device)  # (N, C, H, W) in [-1, 1]
        features = extract_features(self.extractor, x).cpu().numpy()  # (N, D)
        logits = logits_of(self.classifier, x).numpy() if self.classifier is not None else None
        return Scored(features, logits, np.asarray(labels, np.int64))
