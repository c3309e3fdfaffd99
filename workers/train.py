"""The one training loop of fewstep, run by Ray Train on every worker.

(Over 350 lines: the driver side and the worker side of the one loop exchange the same job and checkpoint records; keeping them in one file keeps that contract in view.)

Every trained model (the VAE, the evaluation classifier, the base flow model, each reflow
round, the consistency student) goes through :func:`fit`. The stage hands it a model spec, an optional warm
start, a batch adapter and an :class:`~models.objectives.Objective`; the loop never knows
which stage it serves. It is a plain PyTorch loop with a few Ray calls (the shape of
Ray's ``torch_fashion_mnist`` example):

- DDP over ``resources.workers`` (gloo on CPU, NCCL on GPU, chosen by Ray), bf16 autocast on
  GPU; ``batch_size`` is the global batch, each worker takes its share;
- linear learning-rate warmup, gradient clipping, an EMA of the weights;
- checkpoints (model, EMA, optimizer, objective state, step, RNG, curve) committed to the
  artifact store every ``checkpoint_every`` steps, each with the held-out loss of the EMA and raw
  weights in the curve when the stage hands the job a held-out set (:mod:`workers.heldout`). A run restarted by Ray after a worker
  died, or a stage re-run after the driver died, resumes from the latest one.

Two things keep it close to a plain loop on a small machine (BENCHMARKS.md, "Training"):

- threads: each worker runs :func:`workers.runtime.threads_for` torch threads, i.e. the CPUs it
  holds, and on a single-node local cluster the cores Ray Data does not need while it trains;
- data: with ``cache_data`` (the default) the driver reads the dataset once into Ray's object
  store and splits it into one equal, ordered shard per worker before the workers start; each
  worker holds its shard as tensors. No split coordinator runs beside the training, and a
  restarted worker reads the same shard again. ``cache_data: false`` streams each epoch
  through Ray Train's own dataset split instead, for data larger than memory.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from infra.config import ConfigError, LoopConfig, Resources
from infra.store import Store
from models.ema import ema_copy, ema_decay, ema_update
from models.objectives import Objective, unwrap
from models.registry import build_model
from workers import progress
from workers.data import order_preserving_options
from workers.heldout import HeldOut, heldout_losses
from workers.parts import ordered
from workers.runtime import threads_for, use_threads, worker_env, worker_resources

log = logging.getLogger("fewstep.train")

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# and a worker's ray.train.report waits for the next poll to take it: every checkpoint, and the
# end of every run, waited about a second for it (BENCHMARKS.md, "Training"). A poll is one small
# actor call per worker; 0.2 s keeps that under 1% of a core. Set the variable to override.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"

BatchAdapter = Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


@dataclass(frozen=True)
class CrashOnce:
    """Fault injection for tests and drills: SIGKILL the rank-0 worker process at ``step``,
    once (the ``marker`` file records that it happened, so the resumed run goes on)."""

    step: int
    marker: str


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs; pickled once and shipped to each worker."""

    store: Store
    stage: str
    key: str
    model_spec: dict
    objective: Objective
    config: LoopConfig
    adapt_batch: BatchAdapter
    init_state: dict[str, Tensor] | None = None
    crash: CrashOnce | None = None
    log_every: int = 25
    progress: progress.RemoteProgress | None = None  # set by fit() while someone watches
    threads: int | None = None  # torch threads per worker; set by fit() (None: Ray's OMP_NUM_THREADS)
    heldout: HeldOut | None = None  # scored by rank 0 at every checkpoint (workers.heldout); None: not measured

    @property
    def worker_batch(self) -> int:
        """Each worker's share of the global batch (the config checks that it splits evenly)."""
        return self.config.batch_size // self.config.resources.workers


@dataclass
class TrainResult:
    step: int
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor]
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank in the last attempt
    threads: int = 0  # torch threads rank 0 ran (0: not recorded)
    timing: dict[str, float] = field(default_factory=dict)  # where rank 0's wall time went (see Timing)

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1]["loss"] if self.curve else None

    @property
    def final_heldout_loss(self) -> float | None:
        """The EMA weights' held-out loss at the last step (None: not measured)."""
        return self.curve[-1].get("heldout_loss") if self.curve else None

    @property
    def final_heldout_loss_raw(self) -> float | None:
        return self.curve[-1].get("heldout_loss_raw") if self.curve else None


def fit(job: TrainJob, dataset: ray.data.Dataset, storage_path: str | None = None) -> TrainResult:
    """Train on ``dataset`` (rows already in the adapter's input format) and return the final state.

    Returns at once when the store already holds a checkpoint at the final step.
    """
    checkpoints = job.store.checkpoints(job.stage, job.key)
    latest = checkpoints.latest()
    started, split_s = time.time(), None
    if latest is None or latest.step < job.config.steps:
        resources = job.config.resources
        cached = job.config.cache_data
        if not cached:
            check_room_for_data(job.stage, resources)
        use_gpu = resources.gpus > 0
        scaling = ray.train.ScalingConfig(
            num_workers=resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(resources),  # custom resources pin it to their nodes
        )
        threads = threads_for(resources.cpus, resources.workers, data_cores=0 if cached else 1)
        run_config = ray.train.RunConfig(
            name=f"fewstep-{job.stage}-{job.key[:12]}",
            storage_path=storage_path or os.path.join(os.path.expanduser("~"), "ray_results"),
            # Ray restarts the worker group after a crash; the loop resumes from the store.
            failure_config=ray.train.FailureConfig(max_failures=3),
            worker_runtime_env={"env_vars": worker_env(threads)},
        )
        # Cached: read once here, one ordered shard per rank; streamed: Ray Train splits it per epoch.
        split_started = time.perf_counter()
        shards = split_once(dataset, resources.workers) if cached else None
        split_s = time.perf_counter() - split_started
        os.environ.setdefault(POLL_ENV, POLL_S)  # read (and passed on to the controller) by trainer.fit()
        with progress.watching(job.stage, f"fewstep-progress-{job.stage}-{job.key}") as remote:
            trainer = ray.train.torch.TorchTrainer(
                train_loop_per_worker,
                train_loop_config={
                    "job": dataclasses.replace(job, progress=remote, threads=threads),
                    "shards": shards,
                    "fit_started": started,
                },
                scaling_config=scaling,
                run_config=run_config,
                datasets=None if cached else {"train": dataset},
                # A fixed row order per shard: the seeded epoch orders then make runs replayable.
                dataset_config=ray.train.DataConfig(execution_options=order_preserving_options()),
            )
            trainer.fit()
        latest = checkpoints.latest()
    if latest is None or latest.step < job.config.steps:
        raise RuntimeError(f"{job.stage}: training ended without a final checkpoint (latest={latest and latest.step})")
    timing = dict(latest.state.get("timing", {}))
    if timing and split_s is not None:  # trained just now (not returned from an earlier run's checkpoint)
        timing["teardown_s"] = round(time.time() - started - timing.get("until_last_step_s", 0.0), 3)
        timing["split_s"] = round(split_s, 3)
    return TrainResult(
        step=latest.step,
        model_state=strip(latest.tensors, "model."),
        ema_state=strip(latest.tensors, "ema."),
        curve=list(latest.state.get("curve", [])),
        resumed_from=int(latest.state.get("resumed_from", 0)),
        nodes=list(latest.state.get("nodes", [])),
        threads=int(latest.state.get("threads", 0)),
        timing=timing,
    )


def split_once(dataset: ray.data.Dataset, workers: int) -> list:
    """The dataset read once into Ray's object store (in row order), split into ``workers`` equal shards.

    The driver owns the blocks, so a worker restarted after a crash reads the same shard again.
    """
    return ordered(dataset).materialize().split(workers, equal=True)


def check_room_for_data(stage: str, resources: Resources) -> None:
    """Refuse a worker group that would leave Ray Data no CPU to feed it.

    Ray Train workers hold their CPUs for the whole run; the dataset shards they read are
    produced by Ray Data tasks that need CPUs of their own. If the workers take every CPU
    of the cluster, the read never starts and the run hangs: say so before starting.
    """
    total = float(ray.cluster_resources().get("CPU", 0))
    wanted = resources.workers * resources.cpus
    if wanted > total - 1:
        raise ConfigError(
            f"{stage}: {resources.workers} training workers x {resources.cpus} CPUs = {wanted:g} CPUs, "
            f"but the Ray cluster has {total:g} and Ray Data needs at least 1 more to feed the workers; "
            f"lower {stage}.resources.workers or {stage}.resources.cpus, or add nodes"
        )


def check_rows(stage: str, rows: int, config: LoopConfig) -> None:
    """Refuse, on the driver, data too small for one batch per worker (the loop could not step)."""
    workers = config.resources.workers
    per_worker, share = rows // workers, config.batch_size // workers
    if per_worker < share:
        raise ConfigError(
            f"{stage}: {rows} training rows give each of {workers} workers {per_worker}, fewer than its share "
            f"{share} of batch_size={config.batch_size}; lower {stage}.batch_size, or add data"
        )


def strip(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {name[len(prefix) :]: value for name, value in tensors.items() if name.startswith(prefix)}


def with_prefix(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {prefix + name: value.detach().cpu().contiguous() for name, value in state.items()}


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


def rng_state_tensors() -> dict[str, Tensor]:
    """torch's CPU (and CUDA) RNG state as uint8 tensors, so it lives in safetensors."""
    states = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["rng.cuda"] = torch.cuda.get_rng_state()
    return states


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """The optimizer's state as flat tensors (no pickle): ``opt.<param index>.<name>``."""
    out = {}
    for index, state in optimizer.state_dict()["state"].items():
        for name, value in state.items():
            tensor = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"opt.{index}.{name}"] = tensor.detach().cpu().contiguous()
    return out


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: Mapping[str, Tensor]) -> None:
    state_dict = optimizer.state_dict()
    state: dict[int, dict[str, Tensor]] = {}
    for name, value in tensors.items():
        if not name.startswith("opt."):
            continue
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    state_dict["state"] = state
    optimizer.load_state_dict(state_dict)


class Timing:
    """Where rank 0's wall time goes, in seconds, stored with each checkpoint (``TrainResult.timing``).

    start_s: from ``fit`` on the driver to this loop's first line (controller, worker group,
    process group); setup_s: model, optimizer, resume, DDP wrap; data_s: the first pass over
    the shard; steps_s: the optimizer steps; heldout_s: the held-out loss at checkpoints;
    checkpoint_s: checkpoint commits and the report barrier (all but the last); until_last_step_s: ``fit`` to the last step. ``fit`` adds
    split_s (the driver reading and splitting a cached dataset, inside start_s) and teardown_s
    (the last commit, then the controller noticing the end and stopping the workers).
    """

    def __init__(self, fit_started: float | None):
        self.fit_started = fit_started or time.time()
        self.entered = time.time()
        self.totals: dict[str, float] = {"start_s": self.entered - self.fit_started}
        self.mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        """Add the time since the previous lap to ``phase``."""
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.mark
        self.mark = now

    def as_dict(self) -> dict[str, float]:
        return {
            **{k: round(v, 3) for k, v in self.totals.items()},
            "until_last_step_s": round(time.time() - self.fit_started, 3),
        }


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    job: TrainJob = loop_config["job"]
    timing = Timing(loop_config.get("fit_started"))
    threads = use_threads(job.threads)
    config = job.config
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    checkpoints = job.store.checkpoints(job.stage, job.key)

    torch.manual_seed(config.seed + rank)
    model = build_model(job.model_spec)
    if job.init_state is not None:
        model.load_state_dict(job.init_state)
    ema = ema_copy(model)
    objective = job.objective
    extra = objective.extra_modules()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)

    step, curve, resumed_from, epoch, position = 0, [], 0, 0, 0
    latest = checkpoints.latest()
    if latest is not None:
        model.load_state_dict(strip(latest.tensors, "model."))
        ema.load_state_dict(strip(latest.tensors, "ema."))
        for name, module in extra.items():
            module.load_state_dict(strip(latest.tensors, f"extra.{name}."))
        load_optimizer(optimizer, latest.tensors)
        step = resumed_from = latest.step
        curve = list(latest.state.get("curve", []))
        # Where in the data it stopped: the epoch's order is regenerated, used batches skipped.
        epoch, position = int(latest.state.get("epoch", 0)), int(latest.state.get("position", 0))
        # Rank 0's RNG streams are stored; the other ranks re-derive theirs from the step.
        torch.set_rng_state(latest.tensors["rng.cpu"])
        if "rng.cuda" in latest.tensors and torch.cuda.is_available():
            torch.cuda.set_rng_state(latest.tensors["rng.cuda"])
        if rank:
            torch.manual_seed(config.seed + rank + step)
        if rank == 0:
            log.info("%s: resuming from step %d", job.stage, step)

    model.to(device)
    ema.to(device)
    for module in extra.values():
        module.to(device)
    move_objective(objective, device)
    model = ray.train.torch.prepare_model(model)
    nodes = worker_nodes(context.get_world_size())
    timing.lap("setup_s")

    shards = loop_config.get("shards")
    if shards is not None:
        batches = CachedShard(shards[rank], device)
        batches.data = batches.load()  # the first pass, timed apart from the steps
    else:
        batches = StreamedShard(ray.train.get_dataset_shard("train"), device)
    timing.lap("data_s")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    started, logged_loss, logged_steps = time.perf_counter(), None, 0

    while step < config.steps:
        seen = 0
        for raw in batches.epoch(job.worker_batch, epoch_seed(config.seed, rank, epoch), skip=position):
            seen += 1
            position += 1
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, config.lr, config.warmup_steps)
            batch = job.adapt_batch(raw)
            with autocast:
                out = objective.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            # A warmed-up decay: a 0.999 average of a short run must not stay at the zero init.
            ema_update(ema, unwrap(model), ema_decay(step, config.ema_decay, config.ema_warmup))
            objective.after_step(unwrap(model))
            step += 1
            logged_loss = out.loss.detach() if logged_loss is None else logged_loss + out.loss.detach()
            logged_steps += 1
            checkpoint_now = step % config.checkpoint_every == 0 or step == config.steps

            # A held-out loss goes into the entry of its checkpoint step, so that step is logged too.
            if step % job.log_every == 0 or step == config.steps or (checkpoint_now and job.heldout is not None):
                # One host sync per log interval, never per step.
                mean_loss = float(logged_loss) / max(1, logged_steps)
                logged_loss, logged_steps = None, 0
                elapsed = time.perf_counter() - started
                curve.append({"step": step, "loss": mean_loss, "grad_norm": float(grad_norm), "seconds": elapsed})
                if rank == 0:
                    log.info(
                        "%s step %d/%d loss %.4f (%.2f steps/s)",
                        job.stage,
                        step,
                        config.steps,
                        mean_loss,
                        (step - resumed_from) / max(elapsed, 1e-9),
                    )
                    if job.progress is not None:
                        job.progress.report(step, config.steps, f"loss {mean_loss:.4g}")
            if checkpoint_now:
                timing.lap("steps_s")
                if rank == 0 and job.heldout is not None:
                    record_heldout(job, objective, unwrap(model), ema, device, curve)
                    timing.lap("heldout_s")
                if rank == 0:
                    tensors = {
                        **with_prefix(unwrap(model).state_dict(), "model."),
                        **with_prefix(ema.state_dict(), "ema."),
                        **{
                            k: v
                            for name, module in extra.items()
                            for k, v in with_prefix(module.state_dict(), f"extra.{name}.").items()
                        },
                        **optimizer_tensors(optimizer),
                        **rng_state_tensors(),
                    }
                    checkpoints.save(
                        step,
                        tensors,
                        {
                            "curve": curve,
                            "resumed_from": resumed_from,
                            "epoch": epoch,
                            "position": position,
                            "nodes": nodes,
                            "threads": threads,
                            "timing": timing.as_dict(),
                        },
                    )
                    checkpoints.prune(keep=2)
                # Every worker reports at the same steps: ray.train.report is a barrier.
                ray.train.report({"step": step, "loss": curve[-1]["loss"] if curve else float("nan")})
                timing.lap("checkpoint_s")
            if job.crash is not None and rank == 0 and step == job.crash.step and not os.path.exists(job.crash.marker):
                with open(job.crash.marker, "w") as marker:
                    marker.write(str(step))
                os.kill(os.getpid(), signal.SIGKILL)
            if step >= config.steps:
                break
        if seen == 0 and position == 0:
            raise ConfigError(
                f"{job.stage}: the training data has fewer rows than this worker's batch "
                f"{job.worker_batch}; lower {job.stage}.batch_size, or add data"
            )
        if step < config.steps:
            epoch, position = epoch + 1, 0


def record_heldout(
    job: TrainJob, objective: Objective, model: nn.Module, ema: nn.Module, device: torch.device, curve: list[dict]
) -> None:
    """Rank 0, at a checkpoint: the held-out loss of the EMA and the raw weights into the curve's
    entry for this step (``heldout_loss``, ``heldout_loss_raw``). ``model`` is the bare module: the
    forward passes run outside DDP, so the other ranks wait at the checkpoint barrier, nothing more."""
    losses = heldout_losses(objective, {"heldout_loss": ema, "heldout_loss_raw": model}, job.heldout, device)
    if losses and curve:
        curve[-1].update(losses)
        log.info("%s step %d held-out loss %.4f (raw %.4f)", job.stage, curve[-1]["step"], *losses.values())


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """The seed of one worker's data order in one epoch: a resumed run regenerates it."""
    return (seed * 1_000_003 + rank) * 1_000_003 + epoch


def worker_nodes(world_size: int) -> list[str]:
    """The Ray node id of every rank (one all-gather at start), recorded in checkpoints."""
    node = ray.get_runtime_context().get_node_id()
    if world_size == 1 or not torch.distributed.is_initialized():
        return [node]
    nodes: list[str] = [""] * world_size
    torch.distributed.all_gather_object(nodes, node)
    return nodes


class CachedShard:
    """The worker's shard read once (one Ray Data pass) and held as tensors on the device.

    Right for latents-sized data: every later epoch is a seeded permutation in memory,
    instead of a fresh Ray Data execution per epoch. Each epoch's order comes from its own
    seed (seed, rank, epoch), so a resumed run regenerates it and skips the batches it
    already used. Rows are read in a fixed order (the trainer preserves the dataset's order).
    """

    def __init__(self, shard, device: torch.device):
        self.shard, self.device, self.data = shard, device, None

    def load(self) -> dict[str, Tensor]:
        parts: dict[str, list[Tensor]] = {}
        for batch in self.shard.iter_torch_batches(batch_size=4096, device="cpu"):
            for name, value in batch.items():
                parts.setdefault(name, []).append(value)
        if not parts:
            return {}
        return {name: torch.cat(chunks).to(self.device) for name, chunks in parts.items()}

    def epoch(self, batch_size: int, seed: int, skip: int = 0):
        if self.data is None:
            self.data = self.load()
        rows = len(next(iter(self.data.values()))) if self.data else 0
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed))
        for start in range(skip * batch_size, rows - batch_size + 1, batch_size):
            index = order[start : start + batch_size].to(self.device)
            yield {name: value[index] for name, value in self.data.items()}


class StreamedShard:
    """The worker's shard streamed from Ray Data each epoch, for data larger than memory."""

    def __init__(self, shard, device: torch.device):
        self.shard, self.device = shard, device

    def epoch(self, batch_size: int, seed: int, skip: int = 0):
        """Streams with a seeded local shuffle; a resumed epoch skips what it used (re-reading it)."""
        batches = self.shard.iter_torch_batches(
            batch_size=batch_size,
            drop_last=True,
            device=self.device,
            local_shuffle_buffer_size=max(4 * batch_size, 1024),
            local_shuffle_seed=seed % (2**31),
        )
        for index, batch in enumerate(batches):
            if index >= skip:
                yield batch


def move_objective(objective: Objective, device: torch.device) -> None:
    """Move every module an objective holds (teacher, EMA target) to the worker's device."""
    for value in vars(objective).values():
        if isinstance(value, nn.Module):
            value.to(device)
