"""The classifier stage: the evaluation's default feature space, trained on the real train split.

FID, precision and recall need a feature space. Inception-v3 means nothing on 16x16 digits,
so by default fewstep trains the small CNN of :mod:`models.classifier` on the train split of
the images table and keeps it as its own artifact (file ``classifier``, safetensors + spec).
Its penultimate layer is the feature space; its logits give the class accuracy of
conditional samples. The stage reports its accuracy on the held-out test split, so a reader
knows how much to trust both.

Training runs as one Ray task (``cpus_per_actor`` / ``gpus_per_actor`` of the evaluate
section), so it lands wherever the cluster has room; the driver only writes the result.
The stage key hashes only what changes the classifier (steps, seed and the fixed
hyper-parameters below), so changing ``evaluate.n`` does not retrain it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from infra.config import ConfigError, EvaluateConfig
from infra.store import Manifest, StageWriter, Store
from models.classifier import Classifier, ClassifierConfig, train_classifier
from models.registry import build_model, model_spec
from workers.images import decode_pixels, to_model_range
from workers.stage import run_stage

log = logging.getLogger("fewstep.classifier")

STAGE = "classifier"
BATCH_SIZE = 128
LR = 2e-3
WIDTH = 32
FEATURE_DIM = 64
MAX_SHIFT = 1  # pixels of random translation while training
SCORE_BATCH = 512


# --------------------------------------------------------------------------- real images


@dataclass(frozen=True)
class LabelledPixels:
    """Decoded images of one split, in table (id) order."""

    pixels: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64; -1 = unlabelled


def images_geometry(images: Manifest) -> tuple[int, int, int]:
    """(channels, image_size, num_classes) recorded by the ingest stage."""
    try:
        m = images.metrics
        return int(m["channels"]), int(m["image_size"]), int(m["num_classes"])
    except KeyError as missing:
        raise ValueError(f"images manifest {images.ref} does not record {missing}; pass the ingest stage's manifest") from None


def read_split(store: Store, images: Manifest, split: str, limit: int | None = None) -> LabelledPixels:
    """The first ``limit`` images (by id) of ``split`` from the images table, decoded."""
    channels = images_geometry(images)[0]
    table = store.read_table(images, "images", columns=["split", "label", "image"])
    splits = np.asarray(table.column("split").to_pylist())
    chosen = np.flatnonzero(splits == split)[:limit]
    if len(chosen) == 0:
        return LabelledPixels(np.zeros((0, 1, 1, channels), np.uint8), np.zeros((0,), np.int64))
    column = table.column("image")
    pixels = decode_pixels((column[int(i)].as_py() for i in chosen), channels)  # (N, H, W, C)
    labels = np.asarray(table.column("label").to_pylist(), dtype=np.int64)[chosen]
    return LabelledPixels(pixels, labels)


@torch.no_grad()
def accuracy(classifier: Classifier, pixels: np.ndarray, labels: np.ndarray) -> float | None:
    """Share of labelled images (0 <= y < K) the classifier gets right; None when there are none."""
    keep = (labels >= 0) & (labels < classifier.num_classes)
    if not keep.any():
        return None
    device = next(classifier.parameters()).device
    x = torch.from_numpy(to_model_range(pixels[keep]))  # (N, C, H, W)
    logits = torch.cat([classifier(x[i:i + SCORE_BATCH].to(device)).cpu() for i in range(0, len(x), SCORE_BATCH)])
    return float((logits.argmax(1).numpy() == labels[keep]).mean())


# --------------------------------------------------------------------------- the Ray task


@dataclass(frozen=True)
class FitResult:
    spec: dict
    state: dict[str, torch.Tensor]
    losses: list[float]
    train_accuracy: float | None
    test_accuracy: float | None
    n_train: int
    n_test: int


def fit_classifier(store: Store, images_ref: str, steps: int, seed: int, device: str = "cpu") -> FitResult:
    """Train the classifier on the labelled train images of ``images_ref``; score it on the test split."""
    images = store.get_ref(images_ref)
    channels, image_size, num_classes = images_geometry(images)
    train, test = read_split(store, images, "train"), read_split(store, images, "test")
    labelled = (train.labels >= 0) & (train.labels < num_classes)
    if num_classes < 2 or labelled.sum() < 2:
        raise ConfigError(
            f"the images of {images_ref} have {int(labelled.sum())} labelled train images in {num_classes} classes; "
            "the default classifier feature space needs labels. Set evaluate.extractor to a local TorchScript "
            "or Inception-v3 file instead"
        )
    torch.manual_seed(seed)  # the initial weights
    classifier = Classifier(ClassifierConfig(in_channels=channels, image_size=image_size, num_classes=num_classes,
                                             width=WIDTH, feature_dim=FEATURE_DIM)).to(device)
    x = torch.from_numpy(to_model_range(train.pixels[labelled])).to(device)  # (N, C, H, W)
    y = torch.from_numpy(train.labels[labelled]).to(device)
    losses = train_classifier(classifier, x, y, steps=steps, batch_size=BATCH_SIZE, lr=LR,
                              generator=torch.Generator().manual_seed(seed), max_shift=MAX_SHIFT)
    result = FitResult(
        spec=model_spec(classifier),
        state={k: v.detach().cpu() for k, v in classifier.state_dict().items()},
        losses=losses,
        train_accuracy=accuracy(classifier, train.pixels, train.labels),
        test_accuracy=accuracy(classifier, test.pixels, test.labels),
        n_train=int(labelled.sum()),
        n_test=len(test.labels),
    )
    return result


_fit_task = ray.remote(fit_classifier)


def task_device(gpus: float) -> str:
    return "cuda" if gpus > 0 else "cpu"


# --------------------------------------------------------------------------- the stage


def classifier_section(config: EvaluateConfig) -> dict[str, Any]:
    """What shapes the classifier, and nothing else (so other evaluate fields do not retrain it)."""
    return {"steps": config.classifier_steps, "seed": config.seed, "batch_size": BATCH_SIZE, "lr": LR,
            "width": WIDTH, "feature_dim": FEATURE_DIM, "max_shift": MAX_SHIFT}


def run_classifier(store: Store, config: EvaluateConfig, images: Manifest) -> Manifest:
    """Train (or reuse) the evaluation classifier for ``images``; returns the classifier manifest.

    Files: ``classifier`` (weights + ``classifier.json`` spec), ``curve``. Metrics:
    ``test_accuracy``, ``train_accuracy``, ``final_loss``, ``n_train``, ``n_test``,
    ``num_classes``, ``feature_dim``, ``images_ref``.
    """
    images_geometry(images)

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        from workers.runtime import ensure_ray

        ensure_ray()
        task = _fit_task.options(num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None)
        result: FitResult = ray.get(task.remote(store, images.ref, config.classifier_steps, config.seed,
                                                task_device(config.gpus_per_actor)))
        classifier = build_model(result.spec)
        classifier.load_state_dict(result.state)
        writer.write_model("classifier", classifier, result.spec)
        writer.write_json("curve", {"loss": result.losses})
        log.info("classifier: test accuracy %s on %d images after %d steps",
                 result.test_accuracy, result.n_test, config.classifier_steps)
        return {
            "test_accuracy": result.test_accuracy,
            "train_accuracy": result.train_accuracy,
            "final_loss": result.losses[-1],
            "n_train": result.n_train,
            "n_test": result.n_test,
            "num_classes": classifier.num_classes,
            "feature_dim": classifier.feature_dim,
            "images_ref": images.ref,
        }

    return run_stage(store, STAGE, classifier_section(config), [images], build)


def load_classifier(store: Store, classifier: Manifest) -> Classifier:
    return store.load_model(classifier, "classifier").eval()
