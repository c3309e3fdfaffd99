"""Stage 9, features: the evaluation's feature space, trained on the real train split.

FID, KID, precision and recall need a feature space, and Inception-v3 means nothing on 16x16
digits or 32x32 procedural shapes (and cannot be downloaded here). So fewstep learns one from
the data itself, through the one training loop like every other model:

    labelled data     a small CNN classifier (models.classifier, ClassifierObjective): its
                      penultimate layer is the feature space, its logits give the class
                      accuracy of conditional samples, its test accuracy says how far to trust both;
    unlabelled data   a self-supervised encoder (models.encoder, SimCLR's ContrastiveObjective):
                      its pooled features are the feature space; no class accuracy.

``features.kind: auto`` picks by whether the images have labels. Both spaces make FID and KID
rise monotonically with blur, noise and dropped classes (tests/models/test_metric_sanity.py).
The stage key hashes only this section, so changing the evaluation's settings never retrains it.
"""

from __future__ import annotations

import logging

import torch

from infra.cards import FeaturesCard, ImagesCard
from infra.config import FeaturesConfig
from infra.store import Manifest, StageWriter, Store
from models.classifier import Classifier, ClassifierObjective
from models.classifier import ClassifierConfig as ClassifierNetConfig
from models.encoder import ContrastiveObjective, Encoder, EncoderConfig
from models.objectives import Objective
from models.registry import build_model, model_spec
from workers.batches import PixelBatch
from workers.data import pixel_dataset, read_split
from workers.evaluation.scoring import FEATURES, accuracy
from workers.runner import run_stage
from workers.train import TrainJob, check_rows, fit

log = logging.getLogger("fewstep.features")

STAGE = "features"


def chosen_kind(config: FeaturesConfig, images: ImagesCard) -> str:
    """classifier for labelled images, encoder otherwise (unless the config names one)."""
    if config.kind != "auto":
        return config.kind
    return "classifier" if images.num_classes >= 2 else "encoder"


def network_and_objective(kind: str, config: FeaturesConfig, images: ImagesCard) -> tuple[dict, Objective]:
    torch.manual_seed(config.seed)  # the initial weights
    # What both networks take from the images and the section; the classifier adds its classes.
    common = dict(
        in_channels=images.channels, image_size=images.image_size, width=config.width, feature_dim=config.feature_dim
    )
    if kind == "classifier":
        net = Classifier(ClassifierNetConfig(**common, num_classes=images.num_classes))
        return model_spec(net), ClassifierObjective(max_shift=config.max_shift)
    net = Encoder(EncoderConfig(**common))
    return model_spec(net), ContrastiveObjective(temperature=config.temperature)


def run_features(store: Store, config: FeaturesConfig, images: Manifest) -> Manifest:
    """Train (or reuse) the evaluation's feature space for ``images``; returns the features manifest."""
    card = ImagesCard.from_manifest(images)
    kind = chosen_kind(config, card)
    if kind == "classifier" and card.num_classes < 2:
        raise ValueError(
            f"features.kind: classifier needs labelled images, but {images.ref} has "
            f"{card.num_classes} classes; use features.kind: auto or encoder"
        )
    labelled = kind == "classifier"
    check_rows(STAGE, card.n_train, config)
    section = {**config.keyed(), "kind": kind}

    def build(writer: StageWriter, key: str) -> FeaturesCard:
        spec, objective = network_and_objective(kind, config, card)
        job = TrainJob(
            store=store,
            stage=STAGE,
            key=key,
            model_spec=spec,
            objective=objective,
            config=config,
            adapt_batch=PixelBatch(),
        )
        result = fit(job, pixel_dataset(store, images, "train", labelled_only=labelled))
        net = build_model(spec)
        net.load_state_dict(result.model_state)
        net.eval()
        writer.write_model(FEATURES, net, spec)
        writer.write_json("curve", {"curve": result.curve})
        train, test = read_split(store, images, "train"), read_split(store, images, "test")
        measured = {}
        if labelled:
            measured = {
                "test_accuracy": accuracy(net, test.pixels, test.labels),
                "train_accuracy": accuracy(net, train.pixels, train.labels),
            }
            log.info("features: classifier test accuracy %s on %d images", measured["test_accuracy"], len(test.labels))
        return FeaturesCard(
            kind=kind,
            num_classes=card.num_classes if labelled else 0,
            feature_dim=config.feature_dim,
            images_ref=images.ref,
            n_train=len(train.labels),
            n_test=len(test.labels),
            final_loss=result.final_loss,
            steps=result.step,
            **measured,
        )

    return run_stage(store, STAGE, section, [images], build, source=__name__)
