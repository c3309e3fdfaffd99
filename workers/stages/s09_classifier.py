"""Stage 9, classifier: the evaluation's default feature space, trained on the real train split.

FID, precision and recall need a feature space. Inception-v3 means nothing on 16x16 digits,
so by default fewstep trains the small CNN of :mod:`models.classifier` on the labelled train
split of the images table and keeps it as its own artifact (file ``classifier``, safetensors
+ spec). Its penultimate layer is the feature space; its logits give the class accuracy of
conditional samples. Its accuracy on the held-out test split is in its
:class:`~infra.cards.FeaturesCard`, so a reader knows how much to trust both.

Training runs as one Ray task with the section's resources. The stage key hashes only the
classifier's own section, so changing the evaluation's settings does not retrain it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ray
import torch

from infra.cards import FeaturesCard, ImagesCard
from infra.config import ClassifierConfig, ConfigError
from infra.store import Manifest, StageWriter, Store
from models.classifier import Classifier, train_classifier
from models.classifier import ClassifierConfig as ClassifierNetConfig
from models.registry import build_model, model_spec
from workers.data import read_split
from workers.pixels import to_model_range
from workers.runner import run_stage
from workers.runtime import remote_options
from workers.scoring import accuracy

log = logging.getLogger("fewstep.classifier")

STAGE = "classifier"


@dataclass(frozen=True)
class FitResult:
    spec: dict
    state: dict[str, torch.Tensor]
    losses: list[float]
    card: FeaturesCard


def fit_classifier(store: Store, images_ref: str, config: ClassifierConfig, device: str = "cpu") -> FitResult:
    """Train the classifier on the labelled train images of ``images_ref``; score it on the test split."""
    images = store.get_ref(images_ref)
    card = ImagesCard.from_manifest(images)
    train, test = read_split(store, images, "train"), read_split(store, images, "test")
    labelled = (train.labels >= 0) & (train.labels < card.num_classes)
    if card.num_classes < 2 or labelled.sum() < 2:
        raise ConfigError(
            f"the images of {images_ref} have {int(labelled.sum())} labelled train images in {card.num_classes} "
            "classes; the default classifier feature space needs labels. Set evaluate.extractor to a local "
            "TorchScript or Inception-v3 file instead"
        )
    torch.manual_seed(config.seed)  # the initial weights
    classifier = Classifier(ClassifierNetConfig(in_channels=card.channels, image_size=card.image_size,
                                                num_classes=card.num_classes, width=config.width,
                                                feature_dim=config.feature_dim)).to(device)
    x = torch.from_numpy(to_model_range(train.pixels[labelled])).to(device)  # (N, C, H, W)
    y = torch.from_numpy(train.labels[labelled]).to(device)
    losses = train_classifier(classifier, x, y, steps=config.steps, batch_size=config.batch_size, lr=config.lr,
                              generator=torch.Generator().manual_seed(config.seed), max_shift=config.max_shift)
    summary = FeaturesCard(num_classes=card.num_classes, feature_dim=config.feature_dim, images_ref=images_ref,
                           n_train=int(labelled.sum()), n_test=len(test.labels), final_loss=losses[-1],
                           test_accuracy=accuracy(classifier, test.pixels, test.labels),
                           train_accuracy=accuracy(classifier, train.pixels, train.labels))
    return FitResult(model_spec(classifier), {k: v.detach().cpu() for k, v in classifier.state_dict().items()},
                     losses, summary)


_fit_task = ray.remote(fit_classifier)


def run_classifier(store: Store, config: ClassifierConfig, images: Manifest) -> Manifest:
    """Train (or reuse) the evaluation classifier for ``images``; returns the classifier manifest."""
    ImagesCard.from_manifest(images)

    def build(writer: StageWriter, key: str) -> FeaturesCard:
        from workers.runtime import ensure_ray

        ensure_ray()
        resources = config.resources
        task = _fit_task.options(**remote_options(resources))
        result: FitResult = ray.get(task.remote(store, images.ref, config, "cuda" if resources.gpus > 0 else "cpu"))
        classifier = build_model(result.spec)
        classifier.load_state_dict(result.state)
        writer.write_model("classifier", classifier, result.spec)
        writer.write_json("curve", {"loss": result.losses})
        log.info("classifier: test accuracy %s on %d images after %d steps",
                 result.card.test_accuracy, result.card.n_test, config.steps)
        return result.card

    return run_stage(store, STAGE, config, [images], build, source=__name__)

