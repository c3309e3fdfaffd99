"""Warm starts: a retrain that builds on the served lineage instead of starting over.

The served lineage is what the serving pointer reaches: the served consistency model, the
reflow rounds and the base model behind it (each card's ``teacher_ref``, and the run record of
the run that trained it: a student distilled from base names no reflow round), and the VAE they
decode with. A run with ``retrain.mode`` warm (the default) does, in this order:

1. :func:`plan_retrain`, before any stage: find the lineage and load every parent's weights
   (``model`` = EMA and ``raw``, digests checked). A parent that cannot be loaded fails the run
   with a :class:`~infra.errors.WarmStartError` (``warm``) or is said in one warning line and
   dropped (``warm_or_scratch``: the run trains from scratch).
2. :func:`check_vae`, after ingest: the served VAE is kept while its reconstruction error on the
   test images it has not seen stays within ``vae_tolerance`` of the error its card recorded
   (the lower end of the new error's 95% interval is compared, so a handful of new images does
   not force a retrain by chance). A new VAE is a new latent space: everything retrains from
   scratch, said in a warning line and the run record.
3. :func:`warm_start` per generator stage: base, reflow round k and consistency start from
   their parent's raw weights and EMA (the average goes on at the section's decay, with no
   warm-up) and train ``retrain`` warm steps on the stage's usual
   data, which the incremental latents stage already holds whole (old rows plus new: the
   replay is all of the old data, not a sample).

A warm start enters its stage's key as ``{"warm_start": {"parent", "steps"}}`` beside the
section's values; a stage that does not warm-start is keyed exactly as before. A parent trained
on the very inputs this run gives the stage (a re-run after its challenger was promoted)
is not warm-started from again: the stage repeats the parent's own start, so an unchanged
re-run finds every stage committed.

The weights enter the one training loop as a step-0 checkpoint under the stage's key
(:func:`seed_checkpoint`): the loop resumes from it as from any checkpoint (model, EMA,
the objective's own modules), and a run killed mid-retrain resumes from its latest one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import Tensor, nn

from infra.cards import CardError, GeneratorCard, ImagesCard, VAECard
from infra.config import FeaturesConfig, LoopConfig, RetrainConfig
from infra.errors import StoreError, WarmStartError
from infra.store import SERVING_POINTER, Manifest, Store
from workers.incremental import part_names, read_part
from workers.pixels import decode_pixels, to_model_range
from workers.train_state import EMA, EXTRA, MODEL, RNG_CPU, LoopState, with_prefix
from workers.vae_kinds import load_vae

log = logging.getLogger("fewstep.warm")

WARM_KEY = "warm_start"  # the stage-key entry of a warm start: {"parent": ref, "steps": n}
Z_95 = 1.96  # the normal quantile of a two-sided 95% interval
MEASURE_BATCH = 256
# Generators no stage warm-starts from: an adapter (its base is the lineage), a guidance-distilled base.
NOT_WARM = frozenset({"lora", "guidance_distill"})


# --------------------------------------------------------------------------- the lineage


@dataclass(frozen=True)
class Lineage:
    """The served model and the models behind it, by the flow's names ("base", "reflow_1", "consistency")."""

    served: str
    vae: Manifest
    generators: dict[str, Manifest]
    features: str | None = None  # the evaluation's feature network of the run that trained the served model


def lineage_name(manifest: Manifest, card: GeneratorCard) -> str:
    return f"reflow_{card.round}" if manifest.stage == "reflow" else manifest.stage


def served_lineage(store: Store, pointer: str = SERVING_POINTER) -> Lineage | None:
    """The lineage of what ``pointer`` serves (None: nothing served, or not one of our generators)."""
    ref = store.get_pointer(pointer)
    if ref is None:
        return None
    try:
        manifest = store.get_ref(ref)
        if not GeneratorCard.is_generator(manifest) or manifest.stage == "ddpm":
            log.info("warm start: the served %s is not a flow lineage (base, reflow, consistency)", ref)
            return None
        generators: dict[str, Manifest] = {}
        while manifest is not None:
            card = GeneratorCard.from_manifest(manifest)
            if manifest.stage not in NOT_WARM:
                generators[lineage_name(manifest, card)] = manifest
            manifest = store.get_ref(card.teacher_ref) if card.teacher_ref else None
        refs = run_refs(store, ref)
        for name, other in refs.items():  # reflow rounds a student from base skipped
            if name == "base" or name.startswith("reflow_"):
                generators.setdefault(name, store.get_ref(other))
        vae = store.get_ref(GeneratorCard.from_manifest(store.get_ref(ref)).vae_ref)
        features = refs.get("features")
        if features is not None and store.get(*features.split("/", 1)) is None:
            features = None  # collected since: this run trains its own
    except (StoreError, CardError) as error:
        raise WarmStartError(f"the served lineage of {ref} cannot be read: {error}") from None
    return Lineage(ref, vae, generators, features)


def run_refs(store: Store, ref: str) -> dict[str, str]:
    """The refs of the newest pipeline run whose refs hold ``ref``: a student distilled from base
    (``consistency.teacher: base``) does not name the reflow rounds of its run, nor its features."""
    runs, _ = store.scan_runs()  # a damaged record elsewhere: the teacher chain still stands
    for run in reversed(runs):
        refs = run.get("refs") or {}
        if ref in refs.values():
            return dict(refs)
    return {}


def check_lineage(store: Store, lineage: Lineage) -> None:
    """Load every parent's weights (EMA and raw) and the VAE, digests checked; a WarmStartError if one fails."""
    for name, manifest in lineage.generators.items():
        for weights in ("model", "raw"):
            try:
                store.load_model(manifest, weights)
            except (StoreError, ValueError, RuntimeError, KeyError) as error:
                raise WarmStartError(
                    f"warm start: the served lineage's {name} model {manifest.ref} cannot be loaded "
                    f"({weights!r} weights: {error})"
                ) from None
    try:
        load_vae(store, lineage.vae)
    except (StoreError, ValueError, RuntimeError, KeyError) as error:
        raise WarmStartError(
            f"warm start: the served lineage's VAE {lineage.vae.ref} cannot be loaded ({error})"
        ) from None


@dataclass(frozen=True)
class RetrainPlan:
    """What this run builds on: the served lineage (None: from scratch) and why."""

    mode: str
    lineage: Lineage | None
    reason: str
    fallback: str | None = None  # why a warm start fell back to scratch (warm_or_scratch), if it did

    def parent(self, name: str) -> Manifest | None:
        return self.lineage.generators.get(name) if self.lineage is not None else None

    def as_record(self) -> dict[str, Any]:
        generators = {k: m.ref for k, m in self.lineage.generators.items()} if self.lineage else {}
        return {
            "mode": self.mode,
            "served": self.lineage.served if self.lineage else None,
            "vae": self.lineage.vae.ref if self.lineage else None,
            "parents": generators,
            "features": self.lineage.features if self.lineage else None,
            "reason": self.reason,
            "fallback": self.fallback,
        }


def plan_retrain(store: Store, config: RetrainConfig, pointer: str = SERVING_POINTER) -> RetrainPlan:
    """Step 1 (module docstring): the lineage this run may warm-start from, checked before any stage runs."""
    if config.mode == "scratch":
        return RetrainPlan(config.mode, None, "retrain.mode is scratch")
    try:
        lineage = served_lineage(store, pointer)
        if lineage is None:
            return RetrainPlan(config.mode, None, "no served lineage: from scratch")
        check_lineage(store, lineage)
    except WarmStartError as error:
        if config.mode == "warm":
            raise WarmStartError(
                f"{error}. Nothing was trained. Restore the parent's files, or set retrain.mode: warm_or_scratch "
                "(fall back to scratch when the parent cannot be loaded) or retrain.mode: scratch"
            ) from None
        log.warning("warm start: %s; training from scratch (retrain.mode: warm_or_scratch)", error)
        return RetrainPlan(config.mode, None, f"parent unusable, from scratch: {error}", fallback=str(error))
    log.info("warm start: building on the served %s (%s)", lineage.served, ", ".join(lineage.generators))
    return RetrainPlan(config.mode, lineage, f"warm from the served {lineage.served}")


# --------------------------------------------------------------------------- the VAE


def kept_features(
    store: Store, section: FeaturesConfig, plan: Mapping[str, Any], verdict: Mapping[str, Any] | None, warm: bool
) -> str | None:
    """The served lineage's feature network (``plan["features"]``), for a warm retrain that keeps its VAE
    on grown data, when the features ``section`` is still the one it was trained with; None: the
    features stage runs (from scratch, a new VAE, or a changed section)."""
    ref = plan.get("features")
    if ref is None or not warm or verdict is None or verdict["action"] != "keep":
        return None
    wanted = section.keyed()
    if wanted.get("kind") == "auto":  # resolved at training: the stored one names the kind it chose
        wanted.pop("kind")
    stored = store.get_ref(ref).config
    return ref if all(stored.get(k) == v for k, v in wanted.items()) else None


@dataclass(frozen=True)
class VAEVerdict:
    """Whether the served VAE goes on: ``keep`` (its ref replaces a vae stage), ``same_data`` (it was
    trained on these images: the vae stage returns it), or ``retrain`` (a new VAE, everything retrains)."""

    action: str
    vae_ref: str
    reason: str
    recorded_mse: float | None = None
    measured_mse: float | None = None
    measured_low: float | None = None
    measured_high: float | None = None
    new_test_images: int = 0

    @property
    def kept(self) -> bool:
        return self.action == "keep"

    def as_record(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in VAEVerdict.__dataclass_fields__}


def image_ids(store: Store, images: Manifest) -> set[str]:
    """Every id of an images output, from its small ``index`` parts (the images table without them)."""
    names = part_names(images, "index")
    if not names:
        return set(store.read_table(images, "images", columns=["id"]).column("id").to_pylist())
    return {i for name in names for i in read_part(store, images, f"index/{name}", ["id"]).column("id").to_pylist()}


def unseen_test_pixels(store: Store, images: Manifest, seen: Manifest, limit: int) -> np.ndarray:
    """Up to ``limit`` test images of ``images`` whose id ``seen`` (an earlier images output) lacks, (N, H, W, C) uint8.

    Reads the small ``index`` parts to choose, and only the image parts that hold a chosen row."""
    channels = ImagesCard.from_manifest(images).channels
    old = image_ids(store, seen)
    names = part_names(images, "index")
    parts = [(f"index/{n}", f"images/{n}") for n in names] or [(None, None)]
    pixels: list[np.ndarray] = []
    wanted = limit
    for index_name, images_name in parts:
        if wanted <= 0:
            break
        if index_name is None:  # written without index parts: the whole table
            index = store.read_table(images, "images", columns=["id", "split"])
        else:
            index = read_part(store, images, index_name, ["id", "split"])
        ids, splits = index.column("id").to_pylist(), index.column("split").to_pylist()
        chosen = [i for i, split in zip(ids, splits) if split == "test" and i not in old][:wanted]
        if not chosen:
            continue
        if images_name is None:
            part = store.read_table(images, "images", columns=["id", "image"])
        else:
            part = read_part(store, images, images_name, ["id", "image"])
        part = part.filter(pc.is_in(part.column("id"), value_set=pa.array(chosen, part.schema.field("id").type)))
        pixels.append(decode_pixels((b.as_py() for b in part.column("image")), channels))
        wanted -= len(part)
    return np.concatenate(pixels) if pixels else np.zeros((0, 1, 1, channels), np.uint8)


@torch.inference_mode()
def reconstruction_errors(vae: nn.Module, pixels: np.ndarray) -> Tensor:
    """Per image: the mean squared error of decode(mean of q(z | x)) against x, in the model's [-1, 1] range (N,)."""
    vae = vae.eval()
    errors = []
    for start in range(0, len(pixels), MEASURE_BATCH):
        x = torch.from_numpy(to_model_range(pixels[start : start + MEASURE_BATCH]))  # (B, C, H, W)
        x_hat = vae.decode(vae.encode(x).mean).float()
        errors.append((x_hat - x).pow(2).flatten(1).mean(dim=1))  # (B,)
    return torch.cat(errors) if errors else torch.zeros(0)


def vae_verdict(vae_ref: str, recorded: float | None, errors: Tensor, tolerance: float) -> VAEVerdict:
    """Keep unless the new images' error is above ``recorded x (1 + tolerance)`` beyond its 95% interval:

    mean - 1.96 std / sqrt(n) > recorded (1 + tolerance)   ->   retrain
    """
    n = len(errors)
    if n == 0:
        return VAEVerdict("keep", vae_ref, "no test images it has not seen: kept", recorded, new_test_images=0)
    mean = float(errors.double().mean())
    half = Z_95 * float(errors.double().std()) / math.sqrt(n) if n > 1 else math.inf
    low, high = mean - half, mean + half
    if recorded is None:
        return VAEVerdict(
            "retrain",
            vae_ref,
            "its card records no test reconstruction error to compare with",
            None,
            mean,
            low,
            high,
            n,
        )
    bar = recorded * (1 + tolerance)
    figures = f"test MSE {mean:.4g} [{low:.4g}, {high:.4g}] on {n} new test images against {recorded:.4g} recorded"
    if low > bar:
        return VAEVerdict(
            "retrain", vae_ref, f"{figures}: beyond the tolerance {tolerance:g}", recorded, mean, low, high, n
        )
    return VAEVerdict("keep", vae_ref, f"{figures}: within the tolerance {tolerance:g}", recorded, mean, low, high, n)


def check_vae(
    store: Store, vae: Manifest, images: Manifest, keyed: Mapping[str, Any], tolerance: float, limit: int
) -> VAEVerdict:
    """Step 2 (module docstring): keep the served VAE ``vae`` for ``images``, or not, and why.

    ``keyed``: this run's vae section values (``VAEConfig.keyed``): a VAE made under others is not kept."""
    seen = store.get_ref(vae.inputs[0])  # the images it was trained on
    if seen.ref == images.ref:
        return VAEVerdict("same_data", vae.ref, "the served VAE was trained on these images")
    if any(vae.config.get(k) != v for k, v in keyed.items()):
        changed = sorted(k for k, v in keyed.items() if vae.config.get(k) != v)
        reason = f"the vae section changed ({', '.join(changed)})"
        log.warning(
            "vae: the served %s is not kept (%s): a new VAE, so every model retrains from scratch", vae.ref, reason
        )
        return VAEVerdict("retrain", vae.ref, reason)
    recorded = VAECard.from_manifest(vae).recon_mse
    errors = reconstruction_errors(load_vae(store, vae), unseen_test_pixels(store, images, seen, limit))
    verdict = vae_verdict(vae.ref, recorded, errors, tolerance)
    if verdict.kept:
        log.info("vae: keeping the served %s (%s)", vae.ref, verdict.reason)
    else:
        log.warning(
            "vae: the served %s is not kept (%s): a new VAE, so every model retrains from scratch",
            vae.ref,
            verdict.reason,
        )
    return verdict


# --------------------------------------------------------------------------- one stage's start


@dataclass(frozen=True)
class WarmStart:
    """A generator stage's start from ``parent``'s raw weights and EMA, trained ``steps`` steps."""

    parent: Manifest
    steps: int
    raw: dict[str, Tensor] = field(repr=False, compare=False, default_factory=dict)
    ema: dict[str, Tensor] = field(repr=False, compare=False, default_factory=dict)

    @property
    def key(self) -> dict[str, Any]:
        """What enters the stage key beside the section's values."""
        return {WARM_KEY: {"parent": self.parent.ref, "steps": self.steps}}

    def loop_config(self, config: LoopConfig) -> LoopConfig:
        """The section as the loop runs it: ``steps`` warm steps, and the EMA continued at its full
        decay (its warm-up is for an average of a random start; the parent's is a real one). The key
        keeps the section's own values."""
        return config.model_copy(update={"steps": self.steps, "ema_warmup": 0})


def load_warm_start(store: Store, parent: Manifest, steps: int) -> WarmStart:
    try:
        raw = dict(store.load_model(parent, "raw").state_dict())
        ema = dict(store.load_model(parent, "model").state_dict())
    except (StoreError, ValueError, RuntimeError, KeyError) as error:
        raise WarmStartError(f"warm start: the parent {parent.ref} cannot be loaded ({error})") from None
    return WarmStart(parent, steps, raw, ema)


def warm_start(store: Store, parent: Manifest | None, inputs: Sequence[Manifest], steps: int) -> WarmStart | None:
    """Step 3 (module docstring): how a stage with ``inputs`` starts from ``parent`` (None: from scratch).

    A parent trained on these very inputs is this stage's own earlier output: the stage repeats
    that output's start (its own parent, or scratch), so an unchanged re-run is keyed as before."""
    if parent is None:
        return None
    if list(parent.inputs) == [m.ref for m in inputs]:
        origin = parent.config.get(WARM_KEY)
        if not isinstance(origin, Mapping):
            return None
        parent, steps = store.get_ref(origin["parent"]), int(origin["steps"])
    return load_warm_start(store, parent, steps)


def compatible(store: Store, warm: WarmStart | None, spec: Mapping[str, Any], stage: str) -> WarmStart | None:
    """``warm`` if its parent is the network ``spec`` describes; None (from scratch, said) if the config changed it."""
    if warm is None:
        return None
    parent_spec = store.read_json(warm.parent, "raw.json")
    if parent_spec != json.loads(json.dumps(dict(spec))):  # as JSON: tuples are lists
        log.warning(
            "%s: the served lineage's %s is another network than this config builds (%s against %s): from scratch",
            stage,
            warm.parent.ref,
            parent_spec,
            dict(spec),
        )
        return None
    return warm


def seed_checkpoint(
    store: Store, stage: str, key: str, warm: WarmStart, extra: Mapping[str, nn.Module], seed: int
) -> None:
    """Write the parent's raw weights and EMA as step 0 of ``stage/key`` (unless a checkpoint exists):
    the training loop resumes from it (workers.train_state) with a fresh optimizer.

    ``extra``: the objective's own modules (a consistency target), already built from the parent."""
    checkpoints = store.checkpoints(stage, key)
    if checkpoints.steps():
        return  # a killed warm run: the loop resumes from its own latest checkpoint
    tensors = {**with_prefix(warm.raw, MODEL), **with_prefix(warm.ema, EMA)}
    for name, module in extra.items():
        tensors.update(with_prefix(module.state_dict(), f"{EXTRA}{name}."))
    tensors[RNG_CPU] = torch.Generator().manual_seed(seed).get_state()
    checkpoints.save(0, tensors, LoopState().to_json())
    log.info("%s: warm start from %s, %d steps", stage, warm.parent.ref, warm.steps)
