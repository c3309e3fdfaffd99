"""Feature extractors for FID and precision/recall: images (N, C, H, W) in [-1, 1] -> (N, D).

Four sources, one wrapper (:class:`FeatureExtractor`, an ``nn.Module`` so ``.to(device)``
works):

- :func:`classifier_extractor` - the penultimate layer of fewstep's own classifier
  (models/classifier.py), the default for small labelled images such as the digits.
- :func:`encoder_extractor` - the self-supervised encoder (models/encoder.py), trained on the
  data itself: the feature space of unlabeled data.
- :func:`load_torchscript_extractor` - any user module saved with ``torch.jit.save`` whose
  ``forward`` maps images in [-1, 1] at the dataset's resolution to (N, D) (or (N, D, 1, 1))
  features; it does its own resizing and normalisation. (torch 2.13 marks TorchScript
  deprecated in favour of ``torch.export``; it still loads, with a DeprecationWarning.)
- :func:`load_inception_extractor` - Inception-v3 (models/inception.py, plain torch) from a
  local torchvision-style weights file, 2048-d pool features. torchvision's ImageNet weights
  are not the TF "pt_inception-2015-12-05" weights of published FIDs, so their numbers track
  but do not equal the literature's; the TF weights (as pytorch-fid ships them) load too,
  with the TF graph's pooling.

No file access here (``models/`` reads no files): the loaders take the serialized module as
``bytes`` or an already-opened binary file object. The caller (``workers/``) reads them from
a local path or from the artifact store, which is also how an extractor on S3 is supported.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Callable
from typing import BinaryIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.classifier import Classifier
from models.encoder import Encoder
from models.inception import FEATURE_DIM, Inception3, config_for_state_dict

INCEPTION_SIZE = 299  # Inception-v3's input resolution
INCEPTION_FEATURE_DIM = FEATURE_DIM


class FeatureExtractor(nn.Module):
    """images (N, C, H, W) in [-1, 1] -> features (N, D), with a ``name`` for metric tables.

    f = flatten(net(prepare(images)))
    """

    def __init__(self, net: nn.Module, name: str, prepare: Callable[[Tensor], Tensor] | None = None):
        super().__init__()
        self.net = net
        self.name = name
        self.prepare = prepare
        self.eval()

    def forward(self, images: Tensor) -> Tensor:
        x = self.prepare(images) if self.prepare is not None else images
        features = self.net(x)
        if not isinstance(features, Tensor):
            raise TypeError(
                f"extractor {self.name!r} returned {type(features).__name__}, not a Tensor; "
                "its forward must return the feature tensor (N, D)"
            )
        if features.ndim < 2 or features.shape[0] != images.shape[0]:
            raise ValueError(
                f"extractor {self.name!r} mapped {images.shape[0]} images to shape "
                f"{tuple(features.shape)}; it must return (N, D) features, one row per image"
            )
        return features.flatten(1)  # (N, D)


@torch.no_grad()
def extract_features(extractor: nn.Module, images: Tensor, batch_size: int = 256) -> Tensor:
    """Run ``extractor`` over ``images`` (N, C, H, W) in batches; returns float32 (N, D).

    The images must already be on the extractor's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be positive")
    was_training = extractor.training
    extractor.eval()
    try:
        chunks = [
            extractor(images[start : start + batch_size]).to(torch.float32)
            for start in range(0, images.shape[0], batch_size)
        ]
    finally:
        extractor.train(was_training)
    return torch.cat(chunks)  # (N, D)


class _Features(nn.Module):
    """Adapter so a network's ``features`` (the classifier's or the encoder's) becomes a module's ``forward``."""

    def __init__(self, net: Classifier | Encoder):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.features(x)


def classifier_extractor(classifier: Classifier, name: str = "classifier") -> FeatureExtractor:
    """The classifier's penultimate layer, (N, feature_dim), as an extractor."""
    return FeatureExtractor(_Features(classifier), name=name)


def encoder_extractor(encoder: Encoder, name: str = "encoder") -> FeatureExtractor:
    """The self-supervised encoder's features (before its projection head), (N, feature_dim),
    as an extractor: the feature space of unlabeled data."""
    return FeatureExtractor(_Features(encoder), name=name)


def _as_buffer(data: bytes | BinaryIO, what: str) -> BinaryIO:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(data))
    if hasattr(data, "read"):
        return data
    raise TypeError(
        f"{what} must be bytes or an opened binary file, got {type(data).__name__}; "
        "read the file first, e.g. Path(path).read_bytes() or open(path, 'rb')"
    )


def load_torchscript_extractor(
    data: bytes | BinaryIO,
    name: str = "torchscript",
    map_location: torch.device | None = None,
) -> FeatureExtractor:
    """Load a ``torch.jit.save``-d module (bytes or an opened binary file) as an extractor.

    The module receives images (N, C, H, W) in [-1, 1] and must return (N, D) features.
    ``map_location`` moves its tensors at load time (e.g. to a CPU when it was saved on a GPU).
    """
    try:
        module = torch.jit.load(_as_buffer(data, "a TorchScript extractor"), map_location=map_location)
    except RuntimeError as error:
        raise ValueError(
            f"could not load the TorchScript extractor {name!r}: {error}. Save it with "
            "torch.jit.save(torch.jit.script(module), path) (or torch.jit.trace)"
        ) from error
    return FeatureExtractor(module, name=name)


def _inception_prepare(images: Tensor) -> Tensor:
    """[-1, 1] images of any size and 1 or 3 channels -> (N, 3, 299, 299) in [-1, 1].

    Google's Inception-v3 expects inputs scaled to [-1, 1], which fewstep's images already are
    (so torchvision's ``transform_input``, which maps ImageNet-normalised input there, stays
    off). The resize is bilinear without corner alignment, as pytorch-fid's.
    """
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)  # grey -> RGB, (N, 3, H, W)
    if images.shape[1] != 3:
        raise ValueError(f"Inception-v3 needs 1- or 3-channel images, got {images.shape[1]} channels")
    return F.interpolate(
        images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False
    )  # (N, 3, 299, 299)


class _InceptionFeatures(nn.Module):
    """Adapter so Inception-v3's 2048-d pool layer becomes a module's ``forward``."""

    def __init__(self, inception: Inception3):
        super().__init__()
        self.inception = inception

    def forward(self, x: Tensor) -> Tensor:
        return self.inception.features(x)


def load_inception_extractor(
    data: bytes | BinaryIO,
    map_location: torch.device | None = None,
) -> FeatureExtractor:
    """Inception-v3 (models/inception.py) from a local torchvision-style ``state_dict`` (bytes or
    opened file): 2048-d pool features of images resized to 299x299. No torchvision needed.

    The state dict decides the variant (``config_for_state_dict``): torchvision's ImageNet
    weights with or without the ``AuxLogits`` head (name "inception_v3"), or the TF FID graph's
    1008-class weights with its pooling (name "inception_v3_tf"). The weights are read with
    ``torch.load(weights_only=True)``: tensors only, no pickled code. ``map_location``, when
    given, is the device the extractor is placed on.
    """
    try:
        state = torch.load(_as_buffer(data, "Inception-v3 weights"), map_location=map_location, weights_only=True)
    except (EOFError, RuntimeError, pickle.UnpicklingError) as error:
        raise ValueError(
            f"could not read the Inception-v3 weights ({type(error).__name__}: {str(error)[:200]}); "
            "pass a file written by torch.save(inception_v3(...).state_dict(), path)"
        ) from error
    if not isinstance(state, dict):
        raise ValueError(
            f"the Inception-v3 weights hold a {type(state).__name__}, not a state dict; "
            "save them with torch.save(inception_v3(...).state_dict(), path)"
        )
    config = config_for_state_dict(state)
    net = Inception3(config)
    try:
        net.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"the weights do not fit Inception-v3 with torchvision's names ({config}): {error}. "
            "Save them with torch.save(inception_v3(...).state_dict(), path)"
        ) from error
    if map_location is not None:
        net.to(map_location)
    name = "inception_v3_tf" if config.tf_pooling else "inception_v3"
    return FeatureExtractor(_InceptionFeatures(net), name=name, prepare=_inception_prepare)
