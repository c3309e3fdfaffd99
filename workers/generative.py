"""The generative stages: base flow matching, reflow pairs, reflow rounds, consistency distillation.

Each is ``(store, config section, input manifests) -> Manifest`` and trains through the one
loop in :mod:`workers.train`, handing it an objective:

    base         FlowMatching on latents (noise drawn)            init: none
    pairs        teacher ODE from per-row seeded x_0 -> (x_0, x_1) (Ray Data actor pool)
    reflow       FlowMatching on stored pairs (x_0 given)         init: teacher EMA
    consistency  ConsistencyDistillation, teacher + EMA target    init: teacher EMA

A generator manifest holds ``model`` (EMA weights, safetensors + spec), ``raw`` (the raw
weights), ``curve`` (the loss curve) and metrics naming how to sample it (``sampler``:
``ode`` or ``consistency``) and what decodes it (``vae_ref``, ``latent_scale``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import ray
import torch
from torch import Tensor

from infra.config import ConsistencyConfig, ReflowConfig, TrainConfig, section_dict
from infra.store import Manifest, StageWriter, Store
from infra.tables import tensors_to_table
from models.consistency import ConsistencyDistillation
from models.dit import DiT, dit_config
from models.objectives import FlowMatching
from models.paths import time_sampler
from models.registry import build_model, model_spec
from models.samplers import sample_ode
from workers.sampling import row_seed
from workers.stage import run_stage
from workers.train import CrashOnce, TrainJob, TrainResult, check_rows, fit

log = logging.getLogger("fewstep.generative")


# ---------------------------------------------------------------------------------------
# What a latents or generator manifest says about the data it models


@dataclass(frozen=True)
class LatentInfo:
    shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    scale: float
    vae_ref: str


def latent_info(manifest: Manifest) -> LatentInfo:
    """Read the latent geometry from a latents, pairs or generator manifest's metrics."""
    m = manifest.metrics
    try:
        return LatentInfo(tuple(m["latent_shape"]), int(m["num_classes"]), float(m["latent_scale"]), str(m["vae_ref"]))
    except KeyError as missing:
        raise ValueError(f"{manifest.ref} does not record {missing}; it was not written by a latents or model stage") from None


def info_metrics(info: LatentInfo) -> dict[str, Any]:
    return {"latent_shape": list(info.shape), "num_classes": info.num_classes,
            "latent_scale": info.scale, "vae_ref": info.vae_ref}


def dit_spec(config: TrainConfig, info: LatentInfo) -> dict:
    """A DiT sized for the latents. Label dropout is the objective's job, not the network's."""
    channels, height, _ = info.shape
    net = DiT(dit_config(config.model, input_size=height, in_channels=channels,
                         num_classes=info.num_classes, class_dropout_prob=0.0))
    return model_spec(net)


def load_generator(store: Store, manifest: Manifest, name: str = "model") -> torch.nn.Module:
    return store.load_model(manifest, name).eval()


# ---------------------------------------------------------------------------------------
# Batches: what the loop's rows become before the objective sees them


@dataclass(frozen=True)
class LatentBatch:
    """Latents rows -> {"x_1", "y"}: a posterior sample z = mean + std * eps, times the scale."""

    scale: float
    num_classes: int

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        mean, logvar = rows["mean"].float(), rows["logvar"].float()
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        return {"x_1": z * self.scale, "y": labels_for_training(rows["label"].long(), self.num_classes)}


@dataclass(frozen=True)
class PairBatch:
    """Pairs rows -> {"x_0", "x_1", "y"}: already in the scaled latent space."""

    num_classes: int

    def __call__(self, rows: Mapping[str, Tensor]) -> dict[str, Tensor]:
        y = labels_for_training(rows["label"].long(), self.num_classes)
        return {"x_0": rows["x_0"].float(), "x_1": rows["x_1"].float(), "y": y}


def labels_for_training(labels: Tensor, num_classes: int) -> Tensor:
    """Unlabeled rows (-1) train the null class."""
    return torch.where(labels < 0, torch.full_like(labels, num_classes), labels)


def training_rows(manifest: Manifest) -> int:
    """How many training rows a latents (train split) or pairs manifest holds."""
    return int(manifest.metrics["n_train"] if manifest.stage == "latents" else manifest.metrics["pairs"])


def training_dataset(store: Store, manifest: Manifest, table: str, columns: list[str]) -> "ray.data.Dataset":
    """The train split of a stored table as a Ray Dataset, read straight from the store."""
    from ray.data.expressions import col

    paths = [store.file_path(manifest, name) for name in manifest.files if name == table or name.startswith(table + "/")]
    ds = ray.data.read_parquet(paths, filesystem=store.pa_filesystem)
    if "split" in ds.schema().names:
        ds = ds.filter(expr=col("split") == "train")
    return ds.select_columns(columns)


def write_generator(writer: StageWriter, result: TrainResult, spec: dict, sampler: str,
                    info: LatentInfo, extra: Mapping[str, Any] = ()) -> dict[str, Any]:
    model = build_model(spec)
    model.load_state_dict(result.ema_state)
    writer.write_model("model", model, spec)
    raw = build_model(spec)
    raw.load_state_dict(result.model_state)
    writer.write_model("raw", raw, spec)
    writer.write_json("curve", {"curve": result.curve, "resumed_from": result.resumed_from})
    final = result.curve[-1]["loss"] if result.curve else float("nan")
    return {"sampler": sampler, "steps": result.step, "final_loss": final,
            "resumed_from": result.resumed_from, **info_metrics(info), **dict(extra)}


# ---------------------------------------------------------------------------------------
# Stages


def run_base(store: Store, config: TrainConfig, latents: Manifest, crash: CrashOnce | None = None) -> Manifest:
    """Flow matching of a DiT on the latents (stage ``base``)."""
    info = latent_info(latents)
    check_rows("base", training_rows(latents), config)

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        spec = dit_spec(config, info)
        job = TrainJob(
            store=store, stage="base", key=key, model_spec=spec,
            objective=FlowMatching(time_sampler(config.time_sampling), label_dropout=config.class_dropout),
            config=config, adapt_batch=LatentBatch(info.scale, info.num_classes), crash=crash,
        )
        result = fit(job, training_dataset(store, latents, "latents", ["mean", "logvar", "label"]))
        return write_generator(writer, result, spec, "ode", info)

    return run_stage(store, "base", config, [latents], build)


class PairSampler:
    """Ray Data actor: holds the teacher once; maps rows {id, label} to {x_0, x_1, label}.

    x_0 comes from a generator seeded by (seed, id), so a re-run reproduces every pair,
    whatever the batching or the number of actors.
    """

    def __init__(self, spec: dict, state: dict[str, Tensor], shape: tuple[int, ...], seed: int,
                 solver: str, steps: int, guidance: float, device: str = "auto"):
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
        self.model = build_model(spec)
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.shape, self.seed = tuple(shape), seed
        self.solver, self.steps, self.guidance = solver, steps, guidance

    def noise(self, ids: np.ndarray) -> Tensor:
        rows = [torch.randn(self.shape, generator=torch.Generator().manual_seed(row_seed(self.seed, i))) for i in ids]
        return torch.stack(rows)  # (B, C, H, W)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x_0 = self.noise(batch["id"]).to(self.device)
        y = torch.as_tensor(batch["label"], dtype=torch.long, device=self.device)
        x_1 = sample_ode(self.model, x_0, y, self.steps, self.solver, self.guidance).x_1
        return {"id": batch["id"], "label": batch["label"],
                "x_0": x_0.cpu().numpy().astype(np.float32), "x_1": x_1.cpu().numpy().astype(np.float32)}


def run_pairs(store: Store, config: ReflowConfig, teacher: Manifest, round_index: int) -> Manifest:
    """(x_0, x_1) couplings from the teacher's ODE (stage ``pairs``), on a Ray Data actor pool."""
    info = latent_info(teacher)
    section = {**section_dict(config), "round": round_index}
    section.pop("train")  # training settings do not change the pairs

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        model = load_generator(store, teacher)
        spec, state = model_spec(model), {k: v.cpu() for k, v in model.state_dict().items()}
        k = max(1, info.num_classes)
        ids = np.arange(config.pairs, dtype=np.int64)
        rows = ray.data.from_items([{"id": int(i), "label": int(i % k) if info.num_classes else 0} for i in ids])
        pairs = rows.map_batches(
            PairSampler,
            fn_constructor_kwargs=dict(spec=spec, state=state, shape=info.shape, seed=round_index + 17,
                                       solver=config.solver, steps=config.steps, guidance=config.guidance),
            batch_size=config.batch_size, concurrency=config.num_actors,
            num_cpus=config.cpus_per_actor, num_gpus=config.gpus_per_actor or None,
        )
        columns: dict[str, list[np.ndarray]] = {"id": [], "label": [], "x_0": [], "x_1": []}
        for batch in pairs.iter_batches(batch_size=None, batch_format="numpy"):
            for name in columns:
                columns[name].append(np.asarray(batch[name]))
        arrays = {name: np.concatenate(parts) for name, parts in columns.items()}
        order = np.argsort(arrays["id"])
        table = tensors_to_table({name: array[order] for name, array in arrays.items()})
        writer.write_table("pairs", table, metadata={
            "fewstep.teacher": teacher.ref, "fewstep.teacher_digest": teacher.digest,
            "fewstep.solver": config.solver, "fewstep.steps": str(config.steps),
            "fewstep.guidance": str(config.guidance),
        })
        return {"pairs": int(len(order)), "teacher_ref": teacher.ref, "round": round_index, **info_metrics(info)}

    return run_stage(store, "pairs", section, [teacher], build)


def run_reflow(store: Store, config: ReflowConfig, teacher: Manifest, pairs: Manifest,
               round_index: int, crash: CrashOnce | None = None) -> Manifest:
    """Flow matching on the teacher's pairs, warm-started from the teacher (stage ``reflow``)."""
    info = latent_info(teacher)
    train = config.train
    section = {**section_dict(train), "round": round_index}
    check_rows("reflow", training_rows(pairs), train)

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        teacher_model = load_generator(store, teacher)
        spec = model_spec(teacher_model)
        job = TrainJob(
            store=store, stage="reflow", key=key, model_spec=spec,
            objective=FlowMatching(time_sampler(train.time_sampling), label_dropout=train.class_dropout),
            config=train, adapt_batch=PairBatch(info.num_classes), crash=crash,
            init_state={k: v.cpu() for k, v in teacher_model.state_dict().items()},
        )
        result = fit(job, training_dataset(store, pairs, "pairs", ["x_0", "x_1", "label"]))
        return write_generator(writer, result, spec, "ode", info, {"round": round_index, "teacher_ref": teacher.ref,
                                                                   "pairs_guidance": config.guidance})

    return run_stage(store, "reflow", section, [teacher, pairs], build)


def run_consistency(store: Store, config: ConsistencyConfig, teacher: Manifest, data: Manifest,
                    crash: CrashOnce | None = None) -> Manifest:
    """Consistency distillation of the teacher into a 1-4 step student (stage ``consistency``)."""
    info = latent_info(teacher)
    train = config.train
    check_rows("consistency", training_rows(data), train)

    def build(writer: StageWriter, key: str) -> dict[str, Any]:
        teacher_model = load_generator(store, teacher)
        spec = model_spec(teacher_model)
        state = {k: v.cpu() for k, v in teacher_model.state_dict().items()}
        student = build_model(spec)
        student.load_state_dict(state)
        objective = ConsistencyDistillation(
            teacher=teacher_model, student=student, num_intervals=config.intervals,
            solver=config.teacher_solver, guidance=config.guidance,
            ema_decay=config.target_decay, c=config.huber_c,
        )
        if data.stage == "pairs":
            dataset, adapt = training_dataset(store, data, "pairs", ["x_0", "x_1", "label"]), PairBatch(info.num_classes)
        else:
            dataset, adapt = training_dataset(store, data, "latents", ["mean", "logvar", "label"]), LatentBatch(info.scale, info.num_classes)
        job = TrainJob(store=store, stage="consistency", key=key, model_spec=spec, objective=objective,
                       config=train, adapt_batch=adapt, init_state=state, crash=crash)
        result = fit(job, dataset)
        return write_generator(writer, result, spec, "consistency", info,
                               {"teacher_ref": teacher.ref, "data_ref": data.ref, "guidance": config.guidance})

    return run_stage(store, "consistency", config, [teacher, data], build)
