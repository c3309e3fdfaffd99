"""The pipeline's configuration: one small, frozen section per stage, and the presets.

Every default lives here, once. A stage receives only its own section; the stage key
hashes that section's values except its :class:`Resources` (where a stage runs is not what
it computes), so changing one field re-runs that stage and the ones below it, and moving a
stage to more workers or onto GPUs does not. ``load_config`` merges a preset with a
user's YAML file and refuses unknown fields or wrong values before any work starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the field and the value."""


class StageInputError(ConfigError):
    """A stage's input data (not the code) is unusable: the message says what and what to do.

    A ConfigError, so the CLI prints it as one line and flows do not retry it.
    """


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def keyed(self) -> dict[str, Any]:
        """The values that decide the stage's output: every field but its :class:`Resources`."""
        resources = {name for name in type(self).model_fields if isinstance(getattr(self, name), Resources)}
        return self.model_dump(mode="json", exclude=resources)


class Resources(Section):
    """Where a distributed stage runs, never what it computes (so it is left out of stage keys).

    ``workers`` counts what the stage's engine runs: Ray Train workers (DDP ranks), Ray Data
    actors, concurrent evaluation tasks, or Serve replicas. Each gets ``cpus`` and ``gpus``,
    and ``custom``: Ray custom resources (``{"trainer": 1}``) that pin it to the nodes started
    with them (``ray start --resources '{"trainer": 4}'``, a KubeRay group's ``rayStartParams``).
    """

    workers: int = Field(1, ge=1)
    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)
    custom: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _custom_names_are_custom(self) -> "Resources":
        builtin = {"CPU": "cpus", "GPU": "gpus"}
        for name, amount in self.custom.items():
            if name in builtin:
                raise ValueError(f"custom resource {name!r} is Ray's own: set resources.{builtin[name]} instead")
            if name in ("memory", "object_store_memory") or name.startswith("node:"):
                raise ValueError(f"custom resource {name!r} is reserved by Ray: name your own, e.g. 'trainer'")
            if not amount > 0:
                raise ValueError(f"custom resource {name!r} = {amount}: an amount must be positive")
        return self

    def __hash__(self) -> int:  # frozen, but ``custom`` is a dict: hash its items
        return hash((self.workers, self.cpus, self.gpus, tuple(sorted(self.custom.items()))))


class IngestConfig(Section):
    source: str = "digits"  # "digits", "shapes", an image folder, or a Parquet file/folder (local or s3://)
    image_column: str = "image"  # for Parquet sources: a column of encoded image bytes
    label_column: str | None = "label"  # for Parquet sources; folders take labels from sub-folder names
    image_size: int = Field(16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    limit: int | None = Field(None, ge=1)  # keep the first N images (by id), for quick runs
    resources: Resources = Resources()


class LoopConfig(Section):
    """What the one training loop (``workers.train.fit``) reads: every trained model has these."""

    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=1)  # the global batch, split evenly over the training workers
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, le=1)  # 0: no average (the EMA is the model itself)
    ema_warmup: int = Field(10, ge=0)  # decay_k = min(ema_decay, (1 + k) / (ema_warmup + k)); 0 = none
    checkpoint_every: int = Field(500, ge=1)
    cache_data: bool = True  # hold each worker's shard in memory; False streams it every epoch
    seed: int = 0
    resources: Resources = Resources()

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> "LoopConfig":
        workers = self.resources.workers
        if self.batch_size % workers:
            raise ValueError(f"batch_size={self.batch_size} does not split evenly over resources.workers={workers}: "
                             f"use a multiple of {workers}")
        return self


class VAEConfig(LoopConfig):
    """The vae stage: train the small KL-VAE through the loop, or import a local diffusers one."""

    pretrained: str | None = None  # a local diffusers AutoencoderKL folder instead of training
    latent_channels: int = Field(4, ge=1)
    base_channels: int = Field(32, ge=4)
    downsample: Literal[4, 8] = 4
    beta: float = Field(1e-4, ge=0)
    measure_images: int = Field(4096, ge=2)  # train images (first by id) for the latent scale
    steps: int = Field(600, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)
    ema_decay: float = Field(0.0, ge=0, le=1)  # the VAE is used as trained
    seed: int = 0


class LatentsConfig(Section):
    batch_size: int = Field(256, ge=1)
    resources: Resources = Resources()  # workers = encoder actors


class GeneratorConfig(LoopConfig):
    """A DiT trained by flow matching: the base stage (and, with other defaults, reflow)."""

    model: str = "DiT-T/2"
    class_dropout: float = Field(0.1, ge=0, lt=1)  # label dropout for classifier-free guidance
    time_sampling: Literal["uniform", "logit_normal"] = "logit_normal"


class PairsConfig(Section):
    """Reflow pairs: (x_0, x_1) couplings from the teacher's ODE, on an actor pool."""

    pairs: int = Field(4096, ge=1)
    solver: Literal["euler", "heun"] = "heun"
    steps: int = Field(32, ge=1)
    guidance: float = Field(1.0, ge=0)
    batch_size: int = Field(512, ge=1)
    resources: Resources = Resources()  # workers = sampler actors


class ReflowConfig(GeneratorConfig):
    """Each reflow round: flow matching on the last teacher's pairs, warm-started from it."""

    rounds: int = Field(1, ge=0, le=3)
    steps: int = Field(2000, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)
    time_sampling: Literal["uniform", "logit_normal"] = "uniform"


class ConsistencyConfig(LoopConfig):
    """Consistency distillation of a flow model into a 1-4 step student.

    The default distils the last reflow round on its own pairs and samples the student by
    re-noising along each sample's x_0 ("coupled"), on the distillation's time grid: exact for
    a coupled teacher, and the setup whose 2 and 4 steps beat 1 (BENCHMARKS.md). Distilling the
    base model needs fresh noise on the latents (teacher: base, data: latents).
    """

    teacher: Literal["last_reflow", "base"] = "last_reflow"  # the base model when reflow.rounds is 0
    data: Literal["latents", "pairs"] = "pairs"  # pairs: the last reflow round's (x_0, x_1)
    renoise: Literal["auto", "fresh", "coupled"] = "auto"  # auto: coupled iff the teacher is a reflow round
    grid_times: bool = True  # multistep sampling at times on the training grid n / intervals
    class_dropout: float = Field(0.1, ge=0, lt=1)  # null-label distillation, for unconditional requests
    intervals: int = Field(18, ge=1)  # N of the discretisation 0 = t_0 < ... < t_N = 1
    teacher_solver: Literal["euler", "heun"] = "heun"
    guidance: float = Field(1.0, ge=0)
    target_decay: float = Field(0.95, ge=0, lt=1)  # the EMA target f_theta^-
    huber_c: float | None = Field(None, gt=0)  # None: 0.00054 * sqrt(dim)
    steps: int = Field(2000, ge=1)
    lr: float = Field(2e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _pairs_follow_their_teacher(self) -> "ConsistencyConfig":
        if self.teacher == "base" and self.data == "pairs":
            raise ValueError("teacher: base with data: pairs distils the base model on another model's couplings; "
                             "set data: latents (fresh noise) for the base teacher")
        return self


class ClassifierConfig(LoopConfig):
    """The evaluation's default feature space: a small CNN trained on the labelled train split."""

    width: int = Field(32, ge=1)
    feature_dim: int = Field(64, ge=2)
    max_shift: int = Field(1, ge=0)  # pixels of random translation while training
    steps: int = Field(600, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(0, ge=0)
    ema_decay: float = Field(0.0, ge=0, le=1)


class EvaluateConfig(Section):
    n: int = Field(1000, ge=2)  # generated images per (model, sampler, steps)
    flow_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    flow_solvers: tuple[Literal["euler", "heun"], ...] = ("euler", "heun")
    consistency_steps: tuple[int, ...] = (1, 2, 4)
    guidance: float = Field(1.0, ge=0)  # for base models; reflow models use their pairs' guidance
    extractor: str | None = None  # local Inception-v3 weights or a TorchScript feature module
    extractor_kind: Literal["torchscript", "inception"] = "torchscript"  # how to load `extractor`
    knn_k: int = Field(3, ge=1)
    seed: int = 1234
    resources: Resources = Resources()  # workers = evaluation tasks in flight

    @model_validator(mode="after")
    def _positive_steps(self) -> "EvaluateConfig":
        for field in ("flow_steps", "consistency_steps"):
            bad = [s for s in getattr(self, field) if s < 1]
            if bad:
                raise ValueError(f"{field} must be positive step counts, got {bad}")
        return self


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    steps: int = Field(1, ge=1)  # the served (and promotion-gated) step count
    max_n: int = Field(64, ge=1)
    max_steps: int = Field(64, ge=1)
    max_guidance: float = Field(10.0, ge=0)
    max_batch_size: int = Field(64, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)
    max_queued_requests: int = Field(256, ge=1)
    max_ongoing_requests: int = Field(128, ge=1)  # per replica; at least max_batch_size, or batches never fill
    max_body_bytes: int = Field(65536, ge=1024)  # larger request bodies get 413
    solver: Literal["euler", "heun"] = "euler"  # how flow (ODE) models are sampled
    poll_s: float = Field(1.0, gt=0)  # how often a replica looks at the serving/current pointer
    max_replicas: int | None = Field(None, ge=1)  # set: autoscale between resources.workers and this
    target_ongoing_requests: float = Field(8.0, gt=0)  # the autoscaler's per-replica target
    promote_tolerance: float = Field(0.05, ge=0)  # relative FID slack
    resources: Resources = Resources()  # workers = replicas (the autoscaling minimum with max_replicas)

    @model_validator(mode="after")
    def _consistent_limits(self) -> "ServeConfig":
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                             f"{self.max_batch_size}: a replica could never fill a batch; raise it")
        if self.max_replicas is not None and self.max_replicas < self.resources.workers:
            raise ValueError(f"max_replicas={self.max_replicas} is below resources.workers={self.resources.workers} "
                             "(the autoscaling minimum); raise max_replicas or leave it unset")
        if self.steps > self.max_steps:
            raise ValueError(f"the served steps={self.steps} exceed max_steps={self.max_steps}")
        return self


class PipelineConfig(Section):
    ingest: IngestConfig = IngestConfig()
    vae: VAEConfig = VAEConfig()
    latents: LatentsConfig = LatentsConfig()
    base: GeneratorConfig = GeneratorConfig()
    pairs: PairsConfig = PairsConfig()
    reflow: ReflowConfig = ReflowConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    classifier: ClassifierConfig = ClassifierConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _steps_fit_the_student(self) -> "PipelineConfig":
        grid = self.consistency.intervals if self.consistency.grid_times else None
        if grid is not None and max(self.evaluate.consistency_steps, default=1) > grid:
            raise ValueError(f"evaluate.consistency_steps {list(self.evaluate.consistency_steps)} go beyond the student's "
                             f"time grid of consistency.intervals={grid}: use at most {grid} steps, or more intervals")
        return self


# Overrides of the defaults above. "default" is the quality preset (about 10 min on
# 2 CPU cores); "quick" runs the whole chain in a few minutes, for trying it and for tests.
PRESETS: dict[str, dict[str, Any]] = {
    "default": {},
    "quick": {
        "ingest": {"limit": 600},
        "vae": {"steps": 150, "base_channels": 16, "batch_size": 64, "warmup_steps": 15},
        "base": {"steps": 150, "batch_size": 64, "checkpoint_every": 50, "warmup_steps": 10},
        "pairs": {"pairs": 256, "steps": 8},
        "reflow": {"rounds": 1, "steps": 80, "batch_size": 64, "checkpoint_every": 40},
        "consistency": {"intervals": 8, "steps": 80, "batch_size": 64, "checkpoint_every": 40},
        "classifier": {"steps": 150},
        "evaluate": {"n": 200, "flow_steps": [1, 2, 4, 8], "flow_solvers": ["euler"], "consistency_steps": [1, 2]},
    },
}


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``override`` into a copy of ``base``; nested mappings merge, everything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def describe_validation_error(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown field '{where}': remove it or check its spelling")
        else:
            lines.append(f"  - {where} = {item.get('input')!r}: {item['msg']}")
    return "\n".join(lines)


def load_config(
    preset: str = "default",
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """The preset, then the YAML ``file``, then ``overrides``, validated into a PipelineConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    data = deep_merge({}, PRESETS[preset])
    source = f"preset {preset!r}"
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML file")
        try:
            user = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None
        if not isinstance(user, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(user).__name__}")
        data = deep_merge(data, user)
        source = f"{path} (on preset {preset!r})"
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None
