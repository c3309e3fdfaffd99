"""Inception-v3 (Szegedy et al. 2016) in plain torch, with torchvision's parameter names.

The classic FID feature space is Inception-v3's 2048-d pool layer. torchvision is not a
dependency (its wheels pin one torch build), so the network is written out here; its
``state_dict`` has exactly the keys and shapes of torchvision's
``inception_v3(aux_logits=True)`` (tests/models/inception_v3_state_dict.json), so a state
dict saved from torchvision loads as it is. Two variants of the same keys:

- torchvision's ImageNet weights: 1000 classes, with or without the auxiliary head;
- the TensorFlow FID graph (``pt_inception-2015-12-05``, as ported by pytorch-fid): 1008
  classes, no auxiliary head, and the TF graph's pooling (average pools that do not count
  padding, a max pool in the last block), selected with ``tf_pooling``.
  :func:`config_for_state_dict` picks the variant from the state dict.

Shapes for the usual 299x299 input::

    x (N, 3, 299, 299) in [-1, 1]
    stem: 5 convs, 2 max pools  -> (N, 192, 35, 35)
    Mixed_5b..5d (A)            -> (N, 288, 35, 35)
    Mixed_6a (B)                -> (N, 768, 17, 17)
    Mixed_6b..6e (C)            -> (N, 768, 17, 17)   [AuxLogits reads here when training]
    Mixed_7a (D)                -> (N, 1280, 8, 8)
    Mixed_7b, 7c (E)            -> (N, 2048, 8, 8)
    mean over space             -> (N, 2048)          = features(x)
    fc                          -> (N, num_classes)   = forward(x)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 2048
TF_FID_CLASSES = 1008  # the TF graph's head: 1000 ImageNet classes + 8 unused


@dataclass(frozen=True, kw_only=True)
class InceptionConfig:
    num_classes: int = 1000
    aux_logits: bool = True  # build the auxiliary head (its weights are in most state dicts)
    transform_input: bool = False  # inputs are ImageNet-normalised: map them to [-1, 1] first
    tf_pooling: bool = False  # the TF FID graph's pooling (see the module docstring)


def config_for_state_dict(state: Mapping[str, Tensor]) -> InceptionConfig:
    """The configuration whose parameters a torchvision-style state dict holds.

    Classes from ``fc.weight``; the auxiliary head when ``AuxLogits.*`` keys are present; the
    TF pooling when the head has the TF graph's 1008 classes.
    """
    if "fc.weight" not in state:
        raise ValueError(
            "the state dict has no 'fc.weight', so it is not an Inception-v3 state dict with "
            f"torchvision's names (first keys: {list(state)[:5]}); save inception_v3(...).state_dict()"
        )
    num_classes = int(state["fc.weight"].shape[0])
    return InceptionConfig(
        num_classes=num_classes,
        aux_logits=any(key.startswith("AuxLogits.") for key in state),
        tf_pooling=num_classes == TF_FID_CLASSES,
    )


class ConvBN(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3, as the TF original) -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _average_pool_3x3(x: Tensor, tf_pooling: bool) -> Tensor:
    """3x3 stride-1 average pool; TF's does not count the zero padding at the borders."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=not tf_pooling)


class InceptionA(nn.Module):
    """35x35 block: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | pool-1x1 -> 64 + 64 + 96 + pool_features."""

    def __init__(self, in_channels: int, pool_features: int, tf_pooling: bool):
        super().__init__()
        self.tf_pooling = tf_pooling
        self.branch1x1 = ConvBN(in_channels, 64, 1)
        self.branch5x5_1 = ConvBN(in_channels, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch5x5_2(self.branch5x5_1(x)),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                self.branch_pool(_average_pool_3x3(x, self.tf_pooling)),
            ],
            dim=1,
        )


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17: 3x3/2 | 1x1-3x3-3x3/2 | max pool/2 -> 384 + 96 + in."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = ConvBN(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_channels, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (1x7 and 7x1) -> 4 x 192 channels."""

    def __init__(self, in_channels: int, channels_7x7: int, tf_pooling: bool):
        super().__init__()
        c7 = channels_7x7
        self.tf_pooling = tf_pooling
        self.branch1x1 = ConvBN(in_channels, 192, 1)
        self.branch7x7_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_channels, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        pool = self.branch_pool(_average_pool_3x3(x, self.tf_pooling))
        return torch.cat([self.branch1x1(x), seven, double, pool], dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | max pool/2 -> 320 + 192 + in."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_channels, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_channels, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        seven = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            seven = conv(seven)
        return torch.cat(
            [
                self.branch3x3_2(self.branch3x3_1(x)),
                seven,
                F.max_pool2d(x, kernel_size=3, stride=2),
            ],
            dim=1,
        )


class InceptionE(nn.Module):
    """8x8 block with split 1x3 / 3x1 outputs -> 320 + 2 x 384 + 2 x 384 + 192 = 2048 channels.

    ``max_pool``: the TF FID graph's last block pools with a max, not an average.
    """

    def __init__(self, in_channels: int, tf_pooling: bool, max_pool: bool = False):
        super().__init__()
        self.tf_pooling, self.max_pool = tf_pooling, max_pool
        self.branch1x1 = ConvBN(in_channels, 320, 1)
        self.branch3x3_1 = ConvBN(in_channels, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_channels, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.max_pool:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _average_pool_3x3(x, self.tf_pooling)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(three),
                self.branch3x3_2b(three),
                self.branch3x3dbl_3a(double),
                self.branch3x3dbl_3b(double),
                self.branch_pool(pooled),
            ],
            dim=1,
        )


class InceptionAux(nn.Module):
    """The auxiliary classifier on the 17x17 grid (used in training only; kept for its weights)."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv0 = ConvBN(in_channels, 128, 1)
        self.conv1 = ConvBN(128, 768, 5)
        self.fc = nn.Linear(768, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.avg_pool2d(x, kernel_size=5, stride=3)  # (N, 768, 5, 5)
        x = self.conv1(self.conv0(x))  # (N, 768, 1, 1)
        return self.fc(x.mean(dim=(2, 3)))  # (N, num_classes)


class Inception3(nn.Module):
    """Inception-v3 with torchvision's module names; ``features`` gives the 2048-d pool layer."""

    def __init__(self, config: InceptionConfig):
        super().__init__()
        self.config = config
        tf = config.tf_pooling
        # Registration order is torchvision's, so state_dict() lists keys in its order.
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32, tf_pooling=tf)
        self.Mixed_5c = InceptionA(256, pool_features=64, tf_pooling=tf)
        self.Mixed_5d = InceptionA(288, pool_features=64, tf_pooling=tf)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128, tf_pooling=tf)
        self.Mixed_6c = InceptionC(768, channels_7x7=160, tf_pooling=tf)
        self.Mixed_6d = InceptionC(768, channels_7x7=160, tf_pooling=tf)
        self.Mixed_6e = InceptionC(768, channels_7x7=192, tf_pooling=tf)
        self.AuxLogits = InceptionAux(768, config.num_classes) if config.aux_logits else None
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, tf_pooling=tf)
        self.Mixed_7c = InceptionE(2048, tf_pooling=tf, max_pool=tf)
        self.fc = nn.Linear(FEATURE_DIM, config.num_classes)

    def transform_input(self, x: Tensor) -> Tensor:
        """ImageNet-normalised input -> [-1, 1], per channel (torchvision's ``transform_input``).

        x01 = x std_c + mean_c  =>  2 x01 - 1 = x std_c / 0.5 + (mean_c - 0.5) / 0.5
        """
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device, dtype=x.dtype)[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device, dtype=x.dtype)[:, None, None]
        return x * (std / 0.5) + (mean - 0.5) / 0.5

    def features(self, x: Tensor) -> Tensor:
        """Images (N, 3, H, W), H, W >= 75 (299 as trained) -> pool features (N, 2048)."""
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[2:]) < 75:
            raise ValueError(
                f"Inception-v3 needs RGB images (N, 3, H, W) of at least 75x75 (299x299 as trained), "
                f"got shape {tuple(x.shape)}; resize them first"
            )
        if self.config.transform_input:
            x = self.transform_input(x)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = self.maxpool1(x)  # (N, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (N, 192, 71, 71)
        x = self.maxpool2(x)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (N, 768, 17, 17)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (N, 2048)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits (N, num_classes); dropout is omitted, as in evaluation."""
        return self.fc(self.features(x))
