"""The pipeline's configuration: one small, frozen section per stage, and the presets.

Every default lives here, once. A stage receives only its own section; the stage key
hashes the section's values that shape the stage's output (:meth:`Section.keyed`): not its
:class:`Resources` (where a stage runs is not what it computes), and not the fields a section
names in ``unkeyed`` (whether, how often or on what inputs the flow runs the stage: the round
index and the inputs' digests are keyed where they matter). So changing one field re-runs that
stage and the ones below it; moving a stage onto GPUs, or adding a reflow round, re-runs
nothing already committed. ``load_config`` merges a preset with a user's YAML file and refuses
unknown fields or wrong values before any work starts.

What a value must be, everywhere:

- finite: ``.inf`` / ``.nan`` are refused for every float (no "no clipping" infinity:
  ``grad_clip: 1e6`` clips nothing);
- of its type, strictly: ``"100"`` and ``true`` are not integers, ``1`` is not a boolean; an
  integer is accepted where a float is expected (``lr: 1`` is 1.0);
- within bounds: below, what makes sense; above, what a run on one cluster could use
  (:data:`MAX_STEPS` optimiser steps, :data:`MAX_BATCH` per batch, :data:`MAX_EVAL_IMAGES`
  generated images per evaluation row, :data:`MAX_PAIRS` reflow pairs, :data:`MAX_NFE`
  network evaluations per sample, :data:`MAX_WORKERS` workers, ``image_size`` <= 1024, guidance
  <= :data:`MAX_GUIDANCE`, ``lr`` <= 1, seeds in 0 .. 2**32 - 1), so a typo like ``steps: 1.0e12``
  is refused, not run;
- once: a YAML key repeated in one mapping is an error naming the key and both lines;
- resolvable before any stage runs (:func:`preflight`): ``base.model`` / ``ddpm.model`` name a
  DiT preset, ``evaluate.extractor`` is a local file, ``vae.pretrained`` a local folder.
"""

from __future__ import annotations

import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from infra.presets import PRESETS, deep_merge

# Upper bounds (see the module docstring): far above any sensible run, far below a typo.
MAX_STEPS = 10_000_000  # optimiser steps (and warm-up, checkpoint interval)
MAX_BATCH = 65_536  # rows per batch (global training batch, encoder and sampler batches)
MAX_EVAL_IMAGES = 200_000  # generated images per (model, sampler, steps) row; FID-50k is the usual
MAX_PAIRS = 10_000_000  # reflow (noise, sample) pairs per round
MAX_NFE = 1_000  # ODE steps or consistency steps / intervals per sample
MAX_WORKERS = 1_024  # Ray Train workers, Data actors, evaluation tasks or Serve replicas per stage
MAX_GUIDANCE = 100.0  # classifier-free guidance scale
SEED_LIMIT = 2**32  # seeds are 0 .. 2**32 - 1 (what every RNG fewstep seeds accepts)

# The bounds of the training loop's fields, declared once; a section that trains picks its own defaults.
Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
LearningRate = Annotated[float, Field(gt=0, le=1)]
WarmupSteps = Annotated[int, Field(ge=0, le=MAX_STEPS)]
Decay = Annotated[float, Field(ge=0, le=1)]
TimeSampling = Literal["uniform", "logit_normal"]


def one_scale_is_a_list_of_one(value: Any) -> Any:
    """``guidance: 2`` (the single scale of older configs) is ``guidance: [2]``."""
    return (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def guidance_scales(scales: tuple[float, ...]) -> tuple[float, ...]:
    """A list of classifier-free guidance scales (evaluate, probe): non-empty, in range, each once; sorted."""
    if not scales:
        raise ValueError("give at least one guidance scale, e.g. [1, 2, 4] (1 alone: no guidance)")
    bad = [w for w in scales if not 0 <= w <= MAX_GUIDANCE]
    if bad:
        raise ValueError(f"guidance scales must be in 0..{MAX_GUIDANCE:g}, got {bad}")
    repeated = sorted({w for w in scales if scales.count(w) > 1})
    if repeated:
        raise ValueError(f"guidance scales {repeated} are listed twice; list each scale once")
    return tuple(sorted(float(w) for w in scales))


# The guidance scales an evaluation or probe scores, checked the same way in both sections.
GuidanceScales = Annotated[
    tuple[float, ...], BeforeValidator(one_scale_is_a_list_of_one), AfterValidator(guidance_scales)
]


class ConfigError(ValueError):
    """A configuration the user must fix; the message names the field and the value."""


class StageInputError(ConfigError):
    """A stage's input data (not the code) is unusable: the message says what and what to do.

    A ConfigError, so the CLI prints it as one line and flows do not retry it.
    """


class Section(BaseModel):
    # strict: no "100" -> 100, no true -> 1 (ints still fill float fields); allow_inf_nan: no .inf/.nan.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _lists_are_tuples_and_booleans_not_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        # YAML and JSON have lists, tuple fields want tuples (strict mode takes no list); the items stay strict.
        if isinstance(value, list) and typing.get_origin(annotation) is tuple:
            return tuple(value)
        # Strict mode refuses true for int and float fields, but a Literal[1, 3] would take it as 1.
        if isinstance(value, bool) and annotation is not bool:
            raise ValueError(f"a boolean is not a value of this field; give a {info.field_name} of its type")
        return value

    # Fields that say whether, how often or on what inputs the flow runs the stage, not what it
    # computes: left out of the stage key (as is every Resources field).
    unkeyed: ClassVar[frozenset[str]] = frozenset()

    # Sections whose engine is Ray Train, where ``resources.workers: 0`` means its local mode.
    local_mode: ClassVar[bool] = False

    @model_validator(mode="after")
    def _no_workers_only_where_training_runs_locally(self) -> Section:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Resources) and value.workers == 0 and not self.local_mode:
                raise ValueError(
                    f"{name}.workers = 0 is Ray Train's local mode, which only training stages have; "
                    "give this stage at least 1 worker"
                )
        return self

    def keyed(self) -> dict[str, Any]:
        """The values that decide the stage's output: every field but its Resources and ``unkeyed``."""
        resources = {name for name in type(self).model_fields if isinstance(getattr(self, name), Resources)}
        return self.model_dump(mode="json", exclude=resources | self.unkeyed)


class Resources(Section):
    """Where a distributed stage runs, never what it computes (so it is left out of stage keys).

    ``workers`` counts what the stage's engine runs: Ray Train workers (DDP ranks), Ray Data
    actors, concurrent evaluation tasks, or Serve replicas. A training stage also takes 0: Ray
    Train's local mode, the training function run in the calling process (no worker actors to
    start, and none to restart after a crash). Each gets ``cpus`` and ``gpus``,
    and ``custom``: Ray custom resources (``{"trainer": 1}``) that pin it to the nodes started
    with them (``ray start --resources '{"trainer": 4}'``, a KubeRay group's ``rayStartParams``).
    """

    workers: int = Field(1, ge=0, le=MAX_WORKERS)  # 0: Ray Train local mode (training stages only)
    cpus: float = Field(1.0, gt=0, le=1024)
    gpus: float = Field(0.0, ge=0, le=16)
    custom: dict[str, float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _custom_names_are_custom(self) -> Resources:
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
    # "digits", "shapes", "glyphs", an image folder, or a Parquet file/folder (local or s3://)
    source: str = "digits"
    image_column: str = "image"  # for Parquet sources: a column of encoded image bytes
    label_column: str | None = "label"  # for Parquet sources; folders take labels from sub-folder names
    image_size: int = Field(16, ge=4, le=1024)
    channels: Literal[1, 3] = 1
    test_fraction: float = Field(0.2, gt=0, lt=1)
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    limit: int | None = Field(None, ge=1, le=10**9)  # keep the first N images (by id), for quick runs
    # The procedural sources ("shapes" and "glyphs") both read these two:
    shapes_count: int = Field(20000, ge=10, le=10_000_000)  # how many images to render
    shapes_seed: int = Field(0, ge=0, lt=SEED_LIMIT)  # image i depends only on (seed, i)
    resources: Resources = Resources()


class LoopConfig(Section):
    """What the one training loop (``workers.train.fit``) reads: every trained model has these."""

    steps: Steps = 3000
    batch_size: BatchSize = 128  # the global batch, split evenly over the training workers
    lr: LearningRate = 1e-3
    warmup_steps: WarmupSteps = 100
    grad_clip: float = Field(1.0, gt=0, le=1e6)  # max gradient norm; 1e6 clips nothing
    ema_decay: Decay = 0.999  # 0: no average (the EMA is the model itself)
    ema_warmup: int = Field(10, ge=0, le=MAX_STEPS)  # decay_k = min(ema_decay, (1 + k) / (ema_warmup + k)); 0 = none
    checkpoint_every: Steps = 500
    cache_data: bool = True  # hold each worker's shard in memory; False streams it every epoch
    seed: int = Field(0, ge=0, lt=SEED_LIMIT)
    resources: Resources = Resources()

    local_mode: ClassVar[bool] = True

    @property
    def ranks(self) -> int:
        """How many processes train: the workers, or the one calling process in local mode."""
        return max(1, self.resources.workers)

    @model_validator(mode="after")
    def _batch_splits_over_workers(self) -> LoopConfig:
        if self.resources.workers == 0 and self.resources.gpus > 0:
            raise ValueError(
                "resources.workers = 0 (Ray Train's local mode) trains in the calling process on its CPU; "
                "set workers to 1 or more to train on GPUs"
            )
        workers = self.ranks
        if self.batch_size % workers:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over resources.workers={workers}: "
                f"use a multiple of {workers}"
            )
        return self


class VAEConfig(LoopConfig):
    """The vae stage: train the small KL-VAE through the loop, or import a local diffusers one."""

    pretrained: str | None = None  # a local diffusers AutoencoderKL folder instead of training
    latent_channels: int = Field(4, ge=1, le=64)
    base_channels: int = Field(32, ge=4, le=1024)
    downsample: Literal[4, 8] = 4
    beta: float = Field(1e-4, ge=0, le=100)
    measure_images: int = Field(4096, ge=2, le=1_000_000)  # train images (first by id) for the latent scale
    steps: Steps = 600
    batch_size: BatchSize = 64
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 50
    ema_decay: Decay = 0.0  # the VAE is used as trained


class LatentsConfig(Section):
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    # What the generators learn: the posterior mean of each image (default), or a fresh posterior
    # sample every epoch. A small VAE's posterior std can be as large as the spread of its means
    # (measured: 0.68 vs 0.66 on the shapes benchmark), so samples would be half i.i.d. noise.
    draw: Literal["mean", "sample"] = "mean"
    resources: Resources = Resources()  # workers = encoder actors


# Parts of the generator sections, each declared once; a section lists the parts it has.


class LabelDropout(Section):
    """Every generator stage: the chance a training label becomes the null label, so one network
    also learns the unconditional field (classifier-free guidance, unconditional requests). The
    objective drops the labels (``models.objectives``); the network never does."""

    label_dropout: float = Field(0.1, ge=0, lt=1)


class HeldOutRows(Section):
    """A stage whose objective is scored on held-out rows at each checkpoint (base, reflow, ddpm):
    the first ``heldout_rows`` test-split rows, correct labels, fixed noise and times; 0: none."""

    heldout_rows: int = Field(512, ge=0, le=MAX_BATCH)


class FreshDiT(Section):
    """A stage that builds a new DiT (base, ddpm); reflow and consistency take their teacher's."""

    model: str = "DiT-T/2"  # a preset of models.dit.DIT_PRESETS

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        from models.dit import DIT_PRESETS  # the one list of DiT sizes (imports torch: only when validating)

        if model not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset; choose one of {', '.join(DIT_PRESETS)}")
        return model


class GeneratorConfig(LoopConfig, FreshDiT, LabelDropout, HeldOutRows):
    """The base stage: a DiT trained by flow matching on the latents."""

    time_sampling: TimeSampling = "logit_normal"


class DDPMConfig(LoopConfig, FreshDiT, LabelDropout, HeldOutRows):
    """The optional DDPM baseline: the base DiT trained on the variance-preserving diffusion path
    with eps-prediction (models.diffusion), sampled with DDPM (ancestral) and DDIM. It is
    evaluated beside the flow models but never promoted by the pipeline (promotion takes the
    consistency student). Its diffusion steps are drawn uniformly (no time sampling to choose)."""

    unkeyed = frozenset({"enabled"})  # whether the flow runs it

    enabled: bool = False  # off in quick and default; the RGB quality preset turns it on
    schedule: Literal["linear", "cosine"] = "linear"  # cosine needs x_1 clipping latents lack (models.diffusion)
    diffusion_steps: int = Field(1000, ge=2, le=100_000)  # T, the discrete training steps (linear: T > 20)

    @model_validator(mode="after")
    def _schedule_fits_its_steps(self) -> DDPMConfig:
        if self.schedule == "linear" and self.diffusion_steps <= 20:
            raise ValueError(
                f"the linear schedule's last beta is 20 / T, so it needs diffusion_steps > 20, got "
                f"{self.diffusion_steps}; raise it or use schedule: cosine"
            )
        return self


class PairsConfig(Section):
    """Reflow pairs: (x_0, x_1) couplings from the teacher's ODE, on an actor pool."""

    pairs: int = Field(4096, ge=1, le=MAX_PAIRS)
    solver: Literal["euler", "heun"] = "heun"
    steps: int = Field(32, ge=1, le=MAX_NFE)
    # None: the base model's best guidance, resolved by the flow before the stage runs (the stage
    # key then holds the number); the stage itself refuses None.
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)
    batch_size: int = Field(512, ge=1, le=MAX_BATCH)
    resources: Resources = Resources()  # workers = sampler actors


class ReflowConfig(LoopConfig, LabelDropout, HeldOutRows):
    """Each reflow round: flow matching on the last teacher's pairs, warm-started from it (so
    the network is the teacher's). Round k's key holds k and its inputs, not ``rounds``: adding
    a round trains only the new one."""

    unkeyed = frozenset({"rounds"})  # how many rounds the flow runs

    rounds: int = Field(1, ge=0, le=3)
    steps: Steps = 2000
    lr: LearningRate = 5e-4
    warmup_steps: WarmupSteps = 0
    time_sampling: TimeSampling = "uniform"


class ConsistencyConfig(LoopConfig, LabelDropout):
    """Consistency distillation of a flow model into a 1-4 step student.

    The default distils the base model on fresh noise over the latents and samples the student by
    re-noising with fresh noise, at times on the distillation's grid: measured side by side on the
    shapes benchmark, it ties the other setups at 1 step and beats them at 2 and 4 (BENCHMARKS.md,
    "Multistep consistency"). Distilling the last reflow round on its own pairs (teacher:
    last_reflow, data: pairs) needs re-noising along each sample's x_0 ("coupled", which ``auto``
    picks for a reflow teacher); fresh noise there collapses the samples at 4 steps. Label dropout
    trains the null label too, for unconditional requests.
    """

    # They choose the stage's inputs, whose digests are in the key: the base model as teacher is the
    # same run whether asked for as "base" or as "last_reflow" with no reflow rounds.
    unkeyed = frozenset({"teacher", "data"})

    # last_reflow: the base model when reflow.rounds is 0; guided: the guidance-distilled base
    teacher: Literal["last_reflow", "base", "guided"] = "base"
    data: Literal["latents", "pairs"] = "latents"  # pairs: the last reflow round's (x_0, x_1)
    renoise: Literal["auto", "fresh", "coupled"] = "auto"  # auto: coupled iff the teacher is a reflow round
    grid_times: bool = True  # multistep sampling at times on the training grid n / intervals
    intervals: int = Field(18, ge=1, le=MAX_NFE)  # N of the discretisation 0 = t_0 < ... < t_N = 1
    teacher_solver: Literal["euler", "heun"] = "heun"
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)  # the teacher's; None as in PairsConfig
    target_decay: float = Field(0.95, ge=0, lt=1)  # the EMA target f_theta^-
    huber_c: float | None = Field(None, gt=0, le=100)  # None: 0.00054 * sqrt(dim)
    steps: Steps = 2000
    lr: LearningRate = 2e-4
    warmup_steps: WarmupSteps = 0

    @model_validator(mode="after")
    def _pairs_follow_their_teacher(self) -> ConsistencyConfig:
        if self.teacher in ("base", "guided") and self.data == "pairs":
            raise ValueError(
                "teacher: base with data: pairs distils the base model on another model's couplings; "
                "set data: latents (fresh noise) for the base teacher"
            )
        return self


class FlowMapConfig(LoopConfig, LabelDropout):
    """The flow-map student (models/flowmap.py): the average velocity u(z, s, t) of a flow teacher,
    sampled at any step count by jumps x_t = x_s + (t - s) u(x_s, s, t).

    It starts from the teacher's weights (a DiT with a zero-initialised second time: the teacher
    at init) and is distilled by MeanFlow (a JVP target) or Shortcut (two half steps of itself),
    ``equal_fraction`` of each batch at s = t (the teacher's velocity as target). ``guidance_mode``
    ``target``: the teacher's guided velocity is the target (``guidance``; None resolved by the
    flow as for consistency) and the student is sampled unguided; ``sampling``: distilled at
    guidance 1, classifier-free guidance is applied to u when sampling, at the evaluation's scales.
    """

    # As consistency's: whether the flow runs it, and which inputs it is handed (their digests are keyed).
    unkeyed = frozenset({"enabled", "teacher", "data"})

    enabled: bool = False  # off in default (the digits run's budget); on in quick and shapes
    # last_reflow: the base model when reflow.rounds is 0; guided: the guidance-distilled base
    teacher: Literal["last_reflow", "base", "guided"] = "last_reflow"
    data: Literal["latents", "pairs"] = "latents"  # pairs: the last reflow round's (x_0, x_1)
    # Shortcut by measurement (BENCHMARKS.md, "Flow-map student"): on the shapes preset the two tie
    # within their intervals at 1-8 steps; Shortcut needs no JVP, costs less a step and trains
    # stably with a plain MSE, where MeanFlow's needs the adaptive weighting.
    objective: Literal["meanflow", "shortcut"] = "shortcut"
    guidance_mode: Literal["target", "sampling"] = "target"
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)  # the teacher's; None as in PairsConfig
    equal_fraction: float = Field(0.75, ge=0, le=1)  # share of each batch with s = t (MeanFlow: ~75% best)
    time_sampling: TimeSampling = "uniform"  # how s (and, for MeanFlow, t) are drawn
    # Loss weight 1 / (mse + adaptive_c)^p per sample; None: the objective's own (BENCHMARKS.md,
    # "Flow-map student"). MeanFlow 1, the paper's: with plain MSE (p = 0) its JVP target ran away on
    # the shapes preset's DiT (loss 1.5 -> 1e4 in 1000 steps). Shortcut 0: p = 1 diverged on the 2-D toy.
    adaptive_p: float | None = Field(None, ge=0, le=4)
    adaptive_c: float = Field(1e-3, gt=0, le=100)
    shortcut_levels: int = Field(8, ge=1, le=20)  # Shortcut gaps 1, 1/2, ..., 2^-(levels - 1)
    steps: Steps = 2000
    lr: LearningRate = 2e-4
    warmup_steps: WarmupSteps = 0

    @model_validator(mode="after")
    def _coherent_choices(self) -> FlowMapConfig:
        if self.teacher in ("base", "guided") and self.data == "pairs":
            raise ValueError(
                "teacher: base with data: pairs distils the base model on another model's couplings; "
                "set data: latents (fresh noise) for the base teacher"
            )
        if self.guidance_mode == "sampling" and self.guidance not in (None, 1.0):
            raise ValueError(
                f"guidance_mode: sampling distils at guidance 1 and guides when sampling; guidance={self.guidance} "
                "would guide twice: leave guidance unset, or use guidance_mode: target"
            )
        return self


class GuidanceDistillConfig(LoopConfig, LabelDropout):
    """Guidance distillation (models/guidance_distill.py): the base model's classifier-free-guided
    velocity v_u + w (v_c - v_u), for w drawn from ``scales``, learnt by one network that takes w as
    an input (models/guided_dit.py; built from the base's weights, the base at init), so a guided
    step costs one pass instead of two. It is a flow model: evaluated at the evaluation's scales
    beside the base with real CFG, and a teacher the students can take (``teacher: guided``)."""

    unkeyed = frozenset({"enabled"})  # whether the flow runs it

    enabled: bool = False  # off in quick and default; on in shapes
    scales: tuple[float, float] = (1.0, 4.0)  # w ~ U(low, high) per row
    # Rows at w = 1 exactly (the conditional velocity): without them the shapes DiT's w = 1 drew like
    # the base at w = 2, as a range's end is never drawn (BENCHMARKS.md, "Guidance distillation").
    conditional_fraction: float = Field(0.1, ge=0, le=1)
    time_sampling: TimeSampling = "uniform"  # every time a sampler visits, not the base's logit-normal focus
    steps: Steps = 2000
    lr: LearningRate = 2e-4
    warmup_steps: WarmupSteps = 0

    @field_validator("scales")
    @classmethod
    def _a_range(cls, scales: tuple[float, float]) -> tuple[float, float]:
        low, high = scales
        if not 0 <= low <= high <= MAX_GUIDANCE:
            raise ValueError(f"scales must be (low, high) with 0 <= low <= high <= {MAX_GUIDANCE:g}, got {scales}")
        return scales


LoRATarget = Literal["attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"]


class LoRAConfig(LoopConfig, LabelDropout):
    """LCM-LoRA: a low-rank adapter (models/lora.py) on the frozen base model's projections, trained
    by consistency distillation of that base (models/consistency.py) on the latents with fresh noise.
    Only the adapter is stored (safetensors, with its base's ref); loaded over its base it is a
    1-4 step consistency student, and switched off it is the base again."""

    unkeyed = frozenset({"enabled"})  # whether the flow runs it

    enabled: bool = False  # off in quick and default; on in shapes
    rank: int = Field(8, ge=1, le=1024)
    alpha: float | None = Field(None, gt=0, le=1e4)  # the update's scale is alpha / rank; None: 1
    targets: tuple[LoRATarget, ...] = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    intervals: int = Field(18, ge=1, le=MAX_NFE)  # as consistency.intervals
    grid_times: bool = True
    teacher_solver: Literal["euler", "heun"] = "heun"
    guidance: float | None = Field(None, ge=0, le=MAX_GUIDANCE)  # the base's; None as in PairsConfig
    target_decay: float = Field(0.95, ge=0, lt=1)
    huber_c: float | None = Field(None, gt=0, le=100)
    steps: Steps = 2000
    lr: LearningRate = 1e-3  # an adapter starts at zero and is small: a larger step than a full student's
    warmup_steps: WarmupSteps = 0

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, targets: tuple[str, ...]) -> tuple[str, ...]:
        if not targets:
            raise ValueError("name at least one layer to adapt: attn.qkv, attn.proj, mlp.fc1, mlp.fc2")
        return tuple(dict.fromkeys(targets))


class FeaturesConfig(LoopConfig):
    """The evaluation's feature space, learnt from the train split: a classifier for labelled
    images, a self-supervised (SimCLR) encoder for unlabelled ones (``kind: auto`` picks)."""

    kind: Literal["auto", "classifier", "encoder"] = "auto"
    width: int = Field(32, ge=1, le=1024)
    feature_dim: int = Field(64, ge=2, le=4096)
    max_shift: int = Field(1, ge=0, le=64)  # classifier: pixels of random translation while training
    temperature: float = Field(0.2, gt=0, le=100)  # encoder: NT-Xent temperature
    steps: Steps = 1000
    lr: LearningRate = 2e-3
    warmup_steps: WarmupSteps = 20
    ema_decay: Decay = 0.0

    @model_validator(mode="after")
    def _two_rows_per_batch(self) -> FeaturesConfig:
        if self.batch_size < 2:
            raise ValueError(f"batch_size={self.batch_size}: the encoder's contrastive loss needs at least 2 rows")
        return self


class EvaluateConfig(Section):
    n: int = Field(1000, ge=2, le=MAX_EVAL_IMAGES)  # generated images per (model, sampler, steps)
    flow_steps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    flow_solvers: tuple[Literal["euler", "heun"], ...] = ("euler", "heun")
    consistency_steps: tuple[int, ...] = (1, 2, 4)
    flowmap_steps: tuple[int, ...] = (1, 2, 4, 8)
    diffusion_steps: tuple[int, ...] = (10, 50, 250, 1000)  # at most ddpm.diffusion_steps (T)
    diffusion_samplers: tuple[Literal["ddpm", "ddim"], ...] = ("ddpm", "ddim")
    # Every model whose sampler takes classifier-free guidance (on labelled data) is scored at each
    # scale: each extra scale re-samples every guided row, at 2 network passes per step (w != 0, 1).
    guidance: GuidanceScales = (1.0, 2.0, 4.0)
    extractor: str | None = None  # local Inception-v3 weights or a TorchScript feature module
    extractor_kind: Literal["torchscript", "inception"] = "torchscript"  # how to load `extractor`
    knn_k: int = Field(3, ge=1, le=100)
    seed: int = Field(1234, ge=0, lt=SEED_LIMIT)
    fid_resamples: int = Field(100, ge=2, le=100_000)  # paired bootstrap draws behind every FID interval
    kid_subsets: int = Field(50, ge=2, le=100_000)
    kid_subset_size: int = Field(1000, ge=2, le=MAX_EVAL_IMAGES)  # capped at the sizes of the sets compared
    interval_level: float = Field(0.95, gt=0, lt=1)
    resources: Resources = Resources()  # workers = evaluation tasks in flight

    @model_validator(mode="after")
    def _positive_steps(self) -> EvaluateConfig:
        for field in ("flow_steps", "consistency_steps", "flowmap_steps", "diffusion_steps"):
            bad = [s for s in getattr(self, field) if not 1 <= s <= MAX_NFE]
            if bad:
                raise ValueError(f"{field} must be step counts in 1..{MAX_NFE}, got {bad}")
        return self


class ProbeConfig(Section):
    """The cheap check after each generator stage (s12_probe): has this model learned the data?

    ``n`` images per guidance scale (one scale for a distilled student, which takes no guidance,
    and for unlabelled data), FID against the real test split and class accuracy, beside the
    floor (real train images) and the VAE ceiling at the same ``n``. The verdict warns when the
    class accuracy is below ``min_accuracy_over_chance`` x chance (0: never) or the FID's excess
    over the floor is above ``max_excess_over_ceiling`` x the VAE ceiling's (None: never)."""

    unkeyed = frozenset({"enabled"})  # whether the flow runs it

    enabled: bool = True
    n: int = Field(500, ge=2, le=MAX_EVAL_IMAGES)  # generated images per guidance scale
    guidance: GuidanceScales = (1.0, 2.0, 4.0)
    steps: int = Field(16, ge=1, le=MAX_NFE)  # flow (Euler) and diffusion models
    student_steps: int = Field(4, ge=1, le=MAX_NFE)  # distilled students (capped by their time grid)
    min_accuracy_over_chance: float = Field(2.0, ge=0, le=1000)
    max_excess_over_ceiling: float | None = Field(10.0, gt=0, le=1e6)
    fid_resamples: int = Field(50, ge=2, le=100_000)  # bootstrap draws behind the FID interval
    interval_level: float = Field(0.95, gt=0, lt=1)
    seed: int = Field(1234, ge=0, lt=SEED_LIMIT)
    resources: Resources = Resources()  # the one Ray task that draws and scores


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    steps: int = Field(1, ge=1, le=MAX_NFE)  # the served (and promotion-gated) step count
    max_n: int = Field(64, ge=1, le=4096)
    # The most steps one HTTP request may ask for, whatever the model; a model's sampler may allow
    # fewer (a consistency student: its time grid; a diffusion model: its T). Serving a diffusion
    # model at its 1000 steps needs max_steps: 1000 here. Promotion only compares FIDs at `steps`.
    max_steps: int = Field(64, ge=1, le=MAX_NFE)
    max_guidance: float = Field(10.0, ge=0, le=MAX_GUIDANCE)
    max_batch_size: int = Field(64, ge=1, le=MAX_BATCH)  # requests merged into one batch, at most
    max_batch_images_steps: int = Field(
        4096, ge=1, le=MAX_BATCH * MAX_NFE
    )  # images x steps of one batch, at most (its work)
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=60)  # the longest a batch waits for company
    max_queued_requests: int = Field(256, ge=1, le=10**6)
    max_ongoing_requests: int = Field(
        128, ge=1, le=10**6
    )  # per replica; at least max_batch_size, or batches never fill
    max_body_bytes: int = Field(65536, ge=1024, le=64 * 2**20)  # larger request bodies get 413
    solver: Literal["euler", "heun"] = "euler"  # how flow (ODE) models are sampled
    poll_s: float = Field(1.0, gt=0, le=3600)  # how often a replica looks at the serving/current pointer
    swap_retry_s: float = Field(
        300.0, gt=0, le=86_400
    )  # a model that failed to load is tried again after this (doubling)
    max_replicas: int | None = Field(None, ge=1, le=MAX_WORKERS)  # set: autoscale between resources.workers and this
    target_ongoing_requests: float = Field(8.0, gt=0, le=10**6)  # the autoscaler's per-replica target
    # The promotion gate's absolute bar, read from the evaluation at the served steps, before any
    # comparison with the served model: a candidate whose class accuracy is below this x chance
    # (0: no bar), or whose FID excess over the floor is above this x the VAE ceiling's (None: no
    # bar), is refused, even when nothing is served.
    min_accuracy_over_chance: float = Field(2.0, ge=0, le=1000)
    max_excess_over_ceiling: float | None = Field(10.0, gt=0, le=1e6)
    resources: Resources = Resources()  # workers = replicas (the autoscaling minimum with max_replicas)

    @model_validator(mode="after")
    def _consistent_limits(self) -> ServeConfig:
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError(
                f"max_ongoing_requests={self.max_ongoing_requests} is below max_batch_size="
                f"{self.max_batch_size}: a replica could never fill a batch; raise it"
            )
        if self.max_replicas is not None and self.max_replicas < self.resources.workers:
            raise ValueError(
                f"max_replicas={self.max_replicas} is below resources.workers={self.resources.workers} "
                "(the autoscaling minimum); raise max_replicas or leave it unset"
            )
        if self.steps > self.max_steps:
            raise ValueError(f"the served steps={self.steps} exceed max_steps={self.max_steps}")
        if self.max_n * self.steps > self.max_batch_images_steps:
            raise ValueError(
                f"max_batch_images_steps={self.max_batch_images_steps} is below max_n={self.max_n} x the served "
                f"steps={self.steps}: a request at the limits could never be drawn; raise it or lower max_n"
            )
        return self


class WarmSteps(Section):
    """Training steps of a warm start per generator stage; None: ``retrain.fraction`` of the section's steps."""

    base: int | None = Field(None, ge=1, le=MAX_STEPS)
    reflow: int | None = Field(None, ge=1, le=MAX_STEPS)
    consistency: int | None = Field(None, ge=1, le=MAX_STEPS)


class RetrainConfig(Section):
    """How a run builds on the served lineage (workers.warm). Read by the flow only: it enters no
    stage key by itself; a stage that warm-starts keys its parent's ref and its steps instead.

    ``mode``: ``warm`` starts base, reflow and consistency from the served model's lineage when one
    is served (scratch otherwise) and fails before training if a parent cannot be loaded;
    ``warm_or_scratch`` falls back to scratch then, saying so; ``scratch`` never warm-starts.
    The VAE is kept while its test reconstruction error on the images it has not seen stays
    within ``vae_tolerance`` (relative) of its recorded one; a new VAE retrains everything."""

    mode: Literal["warm", "warm_or_scratch", "scratch"] = "warm"
    fraction: float = Field(0.25, gt=0, le=1)  # warm steps = fraction x the section's steps, unless set below
    steps: WarmSteps = WarmSteps()
    vae_tolerance: float = Field(0.10, ge=0, le=10)  # kept while new test MSE <= recorded x (1 + tolerance)

    def steps_for(self, stage: str, section_steps: int) -> int:
        """The warm steps of generator stage ``stage`` ("base", "reflow", "consistency")."""
        chosen = getattr(self.steps, stage)
        return chosen if chosen is not None else max(1, round(self.fraction * section_steps))


class PipelineConfig(Section):
    ingest: IngestConfig = IngestConfig()
    vae: VAEConfig = VAEConfig()
    latents: LatentsConfig = LatentsConfig()
    base: GeneratorConfig = GeneratorConfig()
    ddpm: DDPMConfig = DDPMConfig()
    pairs: PairsConfig = PairsConfig()
    reflow: ReflowConfig = ReflowConfig()
    consistency: ConsistencyConfig = ConsistencyConfig()
    flowmap: FlowMapConfig = FlowMapConfig()
    guidance_distill: GuidanceDistillConfig = GuidanceDistillConfig()
    lora: LoRAConfig = LoRAConfig()
    features: FeaturesConfig = FeaturesConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    probe: ProbeConfig = ProbeConfig()
    serve: ServeConfig = ServeConfig()
    retrain: RetrainConfig = RetrainConfig()

    @model_validator(mode="after")
    def _steps_fit_the_student(self) -> PipelineConfig:
        grid = self.consistency.intervals if self.consistency.grid_times else None
        if grid is not None and max(self.evaluate.consistency_steps, default=1) > grid:
            raise ValueError(
                f"evaluate.consistency_steps {list(self.evaluate.consistency_steps)} go beyond the student's "
                f"time grid of consistency.intervals={grid}: use at most {grid} steps, or more intervals"
            )
        return self

    @model_validator(mode="after")
    def _guided_teacher_is_trained(self) -> PipelineConfig:
        asking = [name for name in ("consistency", "flowmap") if getattr(self, name).teacher == "guided"]
        if self.flowmap.teacher == "guided" and not self.flowmap.enabled:
            asking.remove("flowmap")
        if asking and not self.guidance_distill.enabled:
            raise ValueError(
                f"{' and '.join(f'{n}.teacher' for n in asking)} is guided, the guidance-distilled base, "
                "but guidance_distill.enabled is false: enable it, or pick teacher base or last_reflow"
            )
        return self

    @model_validator(mode="after")
    def _steps_fit_the_diffusion_schedule(self) -> PipelineConfig:
        T = self.ddpm.diffusion_steps
        beyond = sorted(s for s in set(self.evaluate.diffusion_steps) if s > T)
        if beyond:
            raise ValueError(
                f"evaluate.diffusion_steps {beyond} go beyond the diffusion model's "
                f"ddpm.diffusion_steps={T} training steps: a sampler visits at most T of them; "
                f"use at most {T} steps, or raise ddpm.diffusion_steps"
            )
        return self


def describe_validation_error(error: ValidationError, source: str) -> str:
    """One line per problem, naming the field and the value; a single problem is a single line."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown field '{where}': remove it or check its spelling")
        elif isinstance(item.get("input"), dict):  # a rule across fields: its message names them
            problems.append(f"{where}: {item['msg']}")
        else:
            problems.append(f"{where} = {item.get('input')!r}: {item['msg']}")
    if len(problems) == 1:
        return f"invalid configuration in {source}: {problems[0]}"
    return "\n".join([f"invalid configuration in {source}:", *(f"  - {p}" for p in problems)])


class DuplicateKeyError(yaml.YAMLError):
    """A YAML mapping that names one key twice (PyYAML would silently keep the last)."""


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated within one mapping (``<<`` merges may be overridden)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                line = first_line.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                continue
            if line != key_node.start_mark.line + 1:
                raise DuplicateKeyError(
                    f"key {key!r} appears twice in one mapping (lines {line} and "
                    f"{key_node.start_mark.line + 1}); keep one"
                )
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> Any:
    """A YAML file's content, with repeated keys refused (one line, naming the key and both lines)."""
    try:
        return yaml.load(path.read_text(), Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except DuplicateKeyError as error:
        raise ConfigError(f"config file {str(path)!r}: {error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {error}") from None


def preflight(config: PipelineConfig) -> None:
    """What a config names outside itself must exist before any stage runs: one line, naming the field.

    (Model names are checked by their field; these depend on the machine the flow runs on.)
    """
    extractor = config.evaluate.extractor
    if extractor is not None and ("://" in extractor or not Path(extractor).expanduser().is_file()):
        raise ConfigError(
            f"evaluate.extractor = {extractor!r} is not a local file: give the path of a TorchScript "
            "module (torch.jit.save) or of Inception-v3 weights (extractor_kind: inception), "
            "or remove it to use the classifier's features"
        )
    pretrained = config.vae.pretrained
    if pretrained is not None and not Path(pretrained).expanduser().is_dir():
        raise ConfigError(
            f"vae.pretrained = {pretrained!r} is not a local folder: give the folder of a diffusers "
            "AutoencoderKL (its config.json and weights), or remove it to train fewstep's VAE"
        )


def validate_config(data: Mapping[str, Any], source: str = "the configuration") -> PipelineConfig:
    """``data`` validated into a PipelineConfig and preflighted; every problem is a :class:`ConfigError`."""
    try:
        config = PipelineConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(describe_validation_error(error, source)) from None
    preflight(config)
    return config


def load_config(
    preset: str = "default",
    file: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PipelineConfig:
    """The preset, then the YAML ``file``, then ``overrides``, validated and preflighted into a PipelineConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    data = deep_merge({}, PRESETS[preset])
    source = f"preset {preset!r}"
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist: pass the path of a YAML file")
        user = read_yaml(path) or {}
        if not isinstance(user, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(user).__name__}")
        data = deep_merge(data, user)
        source = f"{path} (on preset {preset!r})"
    if overrides:
        data = deep_merge(data, overrides)
    return validate_config(data, source)
