"""Stage cards: what a committed stage output says about itself, as one typed record each.

A stage writes its card into its manifest's metrics (:meth:`Card.to_metrics`); every reader
gets it back with :meth:`Card.from_manifest`, never by indexing ``manifest.metrics`` with
string keys. A manifest of the wrong stage, or one missing a field the card needs, is a
:class:`CardError` that names the ref and the field; fields with a default are optional by
design (``None`` means "not measured") and say so in their comment.

    images       ImagesCard       ingest
    vae          VAECard          vae
    latents      LatentsCard      latents           (a LatentSpace)
    pairs        PairsCard        pairs             (a LatentSpace)
    generator    GeneratorCard    base, ddpm, reflow, consistency (a LatentSpace)
    features     FeaturesCard     features
    evaluation   EvaluationCard   evaluate
    probe        ProbeCard        probe
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from infra.errors import IntegrityError
from infra.manifest import Manifest, to_jsonable


class CardError(IntegrityError):
    """A manifest that does not hold the card its reader needs (wrong stage, missing field)."""


class Card:
    """Base of every card: a frozen, keyword-only dataclass of JSON-able fields."""

    STAGES: ClassVar[tuple[str, ...]] = ()

    def to_metrics(self) -> dict[str, Any]:
        return to_jsonable(dataclasses.asdict(self), type(self).__name__)

    @classmethod
    def from_manifest(cls, manifest: Manifest):
        if cls.STAGES and manifest.stage not in cls.STAGES:
            raise CardError(
                f"{manifest.ref} is a {manifest.stage!r} output; a {cls.__name__} comes from "
                f"{' or '.join(repr(s) for s in cls.STAGES)} (check the ref: `fewstep status` lists them)"
            )
        return cls.from_metrics(manifest.metrics, manifest.ref)

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, Any], ref: str):
        hints = typing.get_type_hints(cls)
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in metrics:
                values[f.name] = _coerce(hints[f.name], metrics[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise CardError(
                    f"{ref} records no '{f.name}', which its {cls.__name__} needs; it was written by another "
                    "version of fewstep or by hand: re-run the stage (`fewstep run`) to rebuild it"
                )
        return cls(**values)


def _coerce(hint: Any, value: Any) -> Any:
    """JSON gives lists where a card holds tuples; everything else is taken as stored."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        return value if value is None or len(options) != 1 else _coerce(options[0], value)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


# --------------------------------------------------------------------------- data


@dataclass(frozen=True, kw_only=True)
class ImagesCard(Card):
    """The images table: how many, of what geometry, with which classes (0 = unlabelled)."""

    STAGES: ClassVar[tuple[str, ...]] = ("ingest",)

    n_images: int
    n_train: int
    n_test: int
    num_classes: int
    image_size: int
    channels: int
    source_kind: str
    classes: tuple[str, ...] = ()  # class names in id order, where the source names them
    quarantined: int = 0
    duplicates: int = 0
    skipped: int = 0  # files in the source that were not read (hidden names, extensions not read)
    skipped_examples: tuple[str, ...] = ()  # a few of them, "path: why"
    # What this run did (workers.incremental): images decoded now (bad ones included), rows
    # carried over from ``previous_ref`` without decoding, earlier rows whose file is gone.
    decoded: int = 0
    reused: int = 0
    removed: int = 0
    previous_ref: str | None = None

    @property
    def labelled(self) -> bool:
        return self.num_classes > 0


@dataclass(frozen=True, kw_only=True)
class VAECard(Card):
    """A VAE and what it was measured to do on the images it was trained for."""

    STAGES: ClassVar[tuple[str, ...]] = ("vae",)

    latent_scale: float  # 1 / std(mean of q(z | x)) on train images
    latent_shape: tuple[int, int, int]  # (c, h, w)
    in_channels: int
    image_size: int
    latent_channels: int
    downsample: int
    recon_mse_train: float
    measured_on: int  # train images used for the scale
    recon_mse: float | None = None  # test split; None without one
    steps: int | None = None  # training steps; None for an imported (pretrained) VAE
    final_loss: float | None = None
    resumed_from: int = 0
    pretrained: str | None = None
    pretrained_scaling_factor: float | None = None


@dataclass(frozen=True, kw_only=True)
class LatentSpace(Card):
    """Where a latents table or a generator lives: latent geometry, classes, scale and VAE."""

    latent_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    latent_scale: float
    vae_ref: str

    @property
    def space(self) -> LatentSpace:
        return LatentSpace(**self.space_fields())

    def space_fields(self) -> dict[str, Any]:
        """This card's LatentSpace fields, by name (to start a card that lives in the same space)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(LatentSpace)}


@dataclass(frozen=True, kw_only=True)
class LatentsCard(LatentSpace):
    STAGES: ClassVar[tuple[str, ...]] = ("latents",)

    n_latents: int
    n_train: int
    n_test: int
    dtype: str
    draw: str = "mean"  # what the generators train on: "mean" or "sample" of q(z | x)
    encoder_nodes: tuple[str, ...] = ()  # the Ray nodes whose actors encoded the rows
    # What this run did (workers.incremental): rows encoded now, rows carried over from
    # ``previous_ref`` (same VAE, same image) without encoding.
    encoded: int = 0
    reused: int = 0
    previous_ref: str | None = None


@dataclass(frozen=True, kw_only=True)
class PairsCard(LatentSpace):
    """Reflow pairs (x_0, x_1) in the scaled latent space, and the teacher ODE that made them."""

    STAGES: ClassVar[tuple[str, ...]] = ("pairs",)

    pairs: int
    teacher_ref: str
    round: int
    solver: str
    steps: int
    guidance: float
    sampler_nodes: tuple[str, ...] = ()  # the Ray nodes whose actors drew the pairs


# --------------------------------------------------------------------------- models


@dataclass(frozen=True, kw_only=True)
class GeneratorCard(LatentSpace):
    """A trained generator: its family picks its samplers (models.sampling.family_samplers)."""

    STAGES: ClassVar[tuple[str, ...]] = ("base", "ddpm", "reflow", "consistency", "flowmap", "guidance_distill", "lora")

    family: str  # how its network turns noise into latents: models.sampling.FAMILIES
    steps: int  # training steps
    final_loss: float | None = None
    final_heldout_loss: float | None = None  # EMA weights on the held-out set at the last step (None: none)
    final_heldout_loss_raw: float | None = None  # the raw (trained) weights on the same set
    heldout: str | None = None  # what the held-out set is (rows, split, noise); None: not measured
    resumed_from: int = 0
    guidance: float | None = None  # the guidance it is sampled at (None: the evaluation's)
    round: int | None = None  # reflow round
    teacher_ref: str | None = None
    data_ref: str | None = None
    parent_ref: str | None = None  # the served lineage's model it warm-started from (None: from scratch)
    nodes: tuple[str, ...] = ()  # the Ray node of each training rank
    renoise_coupling: float = 0.0  # consistency: re-noise along x_0 (1) or with fresh noise (0)
    num_intervals: int | None = None  # consistency: the time grid n / N it samples on (None: i / k)
    diffusion_schedule: str | None = None  # diffusion: its beta schedule ("linear" or "cosine")
    diffusion_steps: int | None = None  # diffusion: T, its discrete training steps
    objective: str | None = None  # flowmap: how it was distilled ("meanflow" or "shortcut")
    guided_sampling: bool = False  # flowmap: distilled at guidance 1, takes classifier-free guidance when sampled
    adapter_of: str | None = None  # lora: the base model's ref; the stage stores only the adapter
    adapter_fraction: float | None = None  # lora: the adapter's parameters over the base's

    def sampler_params(self) -> dict[str, Any]:
        """What its family's samplers need to know about how it was trained (models.sampling)."""
        params: dict[str, Any] = {"coupling": self.renoise_coupling, "num_intervals": self.num_intervals}
        if self.diffusion_schedule is not None:
            params["diffusion_schedule"] = self.diffusion_schedule
        if self.diffusion_steps is not None:
            params["diffusion_steps"] = self.diffusion_steps
        if self.guided_sampling:
            params["guided"] = True
        return params

    @classmethod
    def is_generator(cls, manifest: Manifest) -> bool:
        return manifest.stage in cls.STAGES


@dataclass(frozen=True, kw_only=True)
class FeaturesCard(Card):
    """The evaluation's feature space, learnt from the real train images: a classifier (labelled
    data; its test accuracy says how far to trust it) or a self-supervised encoder."""

    STAGES: ClassVar[tuple[str, ...]] = ("features",)

    kind: str  # "classifier" | "encoder"
    num_classes: int  # 0 for an encoder
    feature_dim: int
    images_ref: str
    n_train: int
    n_test: int
    final_loss: float | None
    steps: int
    test_accuracy: float | None = None  # a classifier's, on the test split
    train_accuracy: float | None = None

    @property
    def classifies(self) -> bool:
        return self.kind == "classifier"


@dataclass(frozen=True, kw_only=True)
class EvaluationCard(Card):
    """The headline of an evaluate stage; the full table is its ``metrics`` Parquet file."""

    STAGES: ClassVar[tuple[str, ...]] = ("evaluate",)

    rows: int
    extractor: str
    n: int
    seed: int
    knn_k: int
    n_test: int
    images_ref: str
    vae_ref: str
    models: dict[str, str]  # display name -> ref
    best: dict[str, Any] | None = None
    best_by_steps: dict[str, Any] = field(default_factory=dict)
    best_by_model: dict[str, Any] = field(default_factory=dict)  # display name -> its best row (with its guidance)
    floor_fid: float | None = None
    vae_fid: float | None = None
    # the feature space's class accuracy on real train images (floor) and on their VAE
    # reconstructions (ceiling); None when the feature space does not classify
    floor_class_accuracy: float | None = None
    vae_class_accuracy: float | None = None
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> value, low, high, bar, verdict
    floor_fid_interval: tuple[float | None, float | None] | None = None
    straightness: dict[str, float | None] = field(default_factory=dict)
    features_ref: str | None = None
    features_test_accuracy: float | None = None
    fid_resamples: int | None = None
    interval_level: float | None = None


LEARNED = "learned"  # a probe's verdict when the model passes both bars


@dataclass(frozen=True, kw_only=True)
class ProbeCard(Card):
    """The cheap check after a generator stage: its samples at a few guidance scales, scored
    against the real test split beside the floor and the VAE ceiling at the same n.

    ``scales`` holds one entry per guidance scale: ``guidance``, ``fid``, ``fid_low``,
    ``fid_high``, ``class_accuracy``, ``accuracy_low``, ``accuracy_high`` (accuracies None
    without a classifier). ``verdict`` is :data:`LEARNED` or a plain-English warning that names
    the figures and the likely fix."""

    STAGES: ClassVar[tuple[str, ...]] = ("probe",)

    model_ref: str
    model_stage: str  # base, reflow, consistency, ddpm
    sampler: str
    steps: int
    n: int
    extractor: str
    scales: tuple[dict[str, Any], ...]
    best_guidance: float  # the scale of the lowest FID
    verdict: str
    chance: float | None = None  # 1 / num_classes; None for unlabelled data
    floor_fid: float | None = None
    ceiling_fid: float | None = None
    floor_accuracy: float | None = None  # the classifier on real train images
    ceiling_accuracy: float | None = None  # on their VAE reconstructions

    @property
    def learned(self) -> bool:
        return self.verdict == LEARNED

    @property
    def best(self) -> dict[str, Any]:
        return next(s for s in self.scales if s["guidance"] == self.best_guidance)
