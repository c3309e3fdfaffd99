"""The worker side of the one training loop: what each Ray Train worker runs.

    set up  ->  resume  ->  (one epoch, with a checkpoint every ``checkpoint_every`` steps)*

:func:`train_loop_per_worker` is those phases in order; :func:`workers.train.fit` starts it on
every worker. It is a plain PyTorch loop (the shape of Ray's ``torch_fashion_mnist`` example)
that never knows which stage it serves: the job brings the model spec, the batch adapter and
the objective. DDP comes from ``ray.train.torch.prepare_model``; bf16 autocast on GPU; linear
warm-up, gradient clipping and an EMA of the weights on every step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor, nn

from infra.checkpoints import CheckpointStore
from infra.config import ConfigError
from models.ema import ema_copy, ema_decay, ema_update
from models.objectives import Objective, unwrap
from models.registry import build_model
from workers.heldout import heldout_losses
from workers.runtime import use_threads
from workers.train_state import LoopState, pack, restore

if TYPE_CHECKING:
    from workers.train import TrainJob

log = logging.getLogger("fewstep.train")


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    job: TrainJob = loop_config["job"]
    timing = Timing(loop_config.get("fit_started"))
    worker = set_up(job)
    state = resume(worker)
    worker.to_device()
    timing.lap("setup_s")
    batches = open_shard(loop_config.get("shards"), worker.rank, worker.device)
    timing.lap("data_s")
    meter = Meter(resumed_from=state.resumed_from)
    while state.step < job.config.steps:
        one_epoch(worker, state, batches, meter, timing)


# --------------------------------------------------------------------------- set up


@dataclass
class Worker:
    """One rank's training run: its model (DDP-wrapped once on its device), EMA, optimizer, objective."""

    job: TrainJob
    rank: int
    world_size: int
    device: torch.device
    threads: int
    model: nn.Module
    ema: nn.Module
    optimizer: torch.optim.Optimizer
    extra: dict[str, nn.Module]  # the objective's own trained state (a consistency EMA target)
    checkpoints: CheckpointStore
    nodes: list[str] | None = None

    @property
    def bare(self) -> nn.Module:
        """The model without its DDP wrapper (what the EMA follows and checkpoints store)."""
        return unwrap(self.model)

    def to_device(self) -> None:
        """Models and the objective's modules onto this rank's device, then DDP (the model only)."""
        self.model.to(self.device)
        self.ema.to(self.device)
        for module in self.extra.values():
            module.to(self.device)
        move_objective(self.job.objective, self.device)
        self.model = ray.train.torch.prepare_model(self.model)
        self.nodes = worker_nodes(self.world_size)


def set_up(job: TrainJob) -> Worker:
    """A fresh model (or the job's warm start), its EMA and optimizer, on the CPU; seeded per rank."""
    threads = use_threads(job.threads)
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.manual_seed(job.config.seed + rank)
    model = build_model(job.model_spec)
    if job.init_state is not None:
        model.load_state_dict(job.init_state)
    return Worker(
        job=job,
        rank=rank,
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        threads=threads,
        model=model,
        ema=ema_copy(model),
        optimizer=torch.optim.AdamW(model.parameters(), lr=job.config.lr, weight_decay=0.0),
        extra=job.objective.extra_modules(),
        checkpoints=job.store.checkpoints(job.stage, job.key),
    )


def resume(worker: Worker) -> LoopState:
    """The latest checkpoint loaded into the worker's modules and returned as the loop state
    (a fresh one without a checkpoint). Rank 0's RNG streams are stored; the other ranks
    re-derive theirs from the step."""
    latest = worker.checkpoints.latest()
    if latest is None:
        return LoopState()
    restore(latest, worker.model, worker.ema, worker.extra, worker.optimizer)
    state = LoopState.of(latest)
    state.resumed_from = state.step
    if worker.rank:
        torch.manual_seed(worker.job.config.seed + worker.rank + state.step)
    else:
        log.info("%s: resuming from step %d", worker.job.stage, state.step)
    return state


def open_shard(shards: list | None, rank: int, device: torch.device) -> CachedShard | StreamedShard:
    """This rank's data: its cached shard read once now (timed apart from the steps), or a stream."""
    if shards is None:
        return StreamedShard(ray.train.get_dataset_shard("train"), device)
    cached = CachedShard(shards[rank], device)
    cached.data = cached.load()
    return cached


# --------------------------------------------------------------------------- one epoch


def one_epoch(
    worker: Worker, state: LoopState, batches: CachedShard | StreamedShard, meter: Meter, timing: Timing
) -> None:
    """Steps over one epoch of this rank's shard (resuming mid-epoch where the state says), with a
    checkpoint at every ``checkpoint_every`` steps; stops early at the last step."""
    job, config = worker.job, worker.job.config
    seen = 0
    seed = epoch_seed(config.seed, worker.rank, state.epoch)
    for raw in batches.epoch(job.worker_batch, seed, skip=state.position):
        seen += 1
        state.position += 1
        loss, grad_norm = train_step(worker, state.step, raw)
        state.step += 1
        meter.add(loss)
        checkpoint_now = state.step % config.checkpoint_every == 0 or state.step == config.steps
        # A held-out loss goes into the entry of its checkpoint step, so that step is logged too.
        if (
            state.step % job.log_every == 0
            or state.step == config.steps
            or (checkpoint_now and job.heldout is not None)
        ):
            log_interval(worker, state, meter, grad_norm)
        if checkpoint_now:
            timing.lap("steps_s")
            checkpoint(worker, state, timing)
            timing.lap("checkpoint_s")
        if job.crash is not None and worker.rank == 0 and state.step == job.crash.step:
            crash_once(job.crash.marker, state.step)
        if state.step >= config.steps:
            return
    if seen == 0 and state.position == 0:
        raise ConfigError(
            f"{job.stage}: the training data has fewer rows than this worker's batch "
            f"{job.worker_batch}; lower {job.stage}.batch_size, or add data"
        )
    state.epoch, state.position = state.epoch + 1, 0


def train_step(worker: Worker, step: int, raw: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """One optimizer step on one batch: (loss, gradient norm), both still on the device."""
    config, objective = worker.job.config, worker.job.objective
    for group in worker.optimizer.param_groups:
        group["lr"] = learning_rate(step, config.lr, config.warmup_steps)
    batch = worker.job.adapt_batch(raw)
    with torch.autocast(worker.device.type, dtype=torch.bfloat16, enabled=worker.device.type == "cuda"):
        out = objective.loss(worker.model, batch)
    worker.optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(worker.model.parameters(), config.grad_clip)
    worker.optimizer.step()
    # A warmed-up decay: a 0.999 average of a short run must not stay at the zero init.
    ema_update(worker.ema, worker.bare, ema_decay(step, config.ema_decay, config.ema_warmup))
    objective.after_step(worker.bare)
    return out.loss.detach(), grad_norm


class Meter:
    """The running training loss between log lines, summed on the device (one host sync per interval)."""

    def __init__(self, resumed_from: int):
        self.started, self.resumed_from = time.perf_counter(), resumed_from
        self.total: Tensor | None = None
        self.steps = 0

    def add(self, loss: Tensor) -> None:
        self.total = loss if self.total is None else self.total + loss
        self.steps += 1

    def take(self) -> float:
        """The mean loss since the last call (a CPU-GPU sync point), and start a new interval."""
        mean = float(self.total) / max(1, self.steps) if self.total is not None else float("nan")
        self.total, self.steps = None, 0
        return mean


def log_interval(worker: Worker, state: LoopState, meter: Meter, grad_norm: Tensor) -> None:
    """A curve entry (every rank keeps the same curve) and, on rank 0, a log line and progress."""
    job = worker.job
    mean_loss, elapsed = meter.take(), time.perf_counter() - meter.started
    state.curve.append({"step": state.step, "loss": mean_loss, "grad_norm": float(grad_norm), "seconds": elapsed})
    if worker.rank:
        return
    rate = (state.step - meter.resumed_from) / max(elapsed, 1e-9)
    log.info("%s step %d/%d loss %.4f (%.2f steps/s)", job.stage, state.step, job.config.steps, mean_loss, rate)
    if job.progress is not None:
        job.progress.report(state.step, job.config.steps, f"loss {mean_loss:.4g}")


# --------------------------------------------------------------------------- checkpoint


def checkpoint(worker: Worker, state: LoopState, timing: Timing) -> None:
    """Rank 0 scores the held-out set and commits the checkpoint (keeping the newest two); then
    every rank reports, at the same steps: ``ray.train.report`` is a barrier."""
    if worker.rank == 0:
        if worker.job.heldout is not None:
            record_heldout(worker, state.curve)
            timing.lap("heldout_s")
        state.nodes, state.threads, state.timing = worker.nodes or [], worker.threads, timing.as_dict()
        tensors = pack(worker.bare, worker.ema, worker.extra, worker.optimizer)
        worker.checkpoints.save(state.step, tensors, state.to_json())
        worker.checkpoints.prune(keep=2)
    ray.train.report({"step": state.step, "loss": state.curve[-1]["loss"] if state.curve else float("nan")})


def record_heldout(worker: Worker, curve: list[dict]) -> None:
    """Rank 0, at a checkpoint: the held-out loss of the EMA and the raw weights into the curve's
    entry for this step (``heldout_loss``, ``heldout_loss_raw``). The forward passes run on the
    bare module, outside DDP, so the other ranks wait at the checkpoint barrier, nothing more."""
    job = worker.job
    models = {"heldout_loss": worker.ema, "heldout_loss_raw": worker.bare}
    losses = heldout_losses(job.objective, models, job.heldout, worker.device)
    if losses and curve:
        curve[-1].update(losses)
        log.info("%s step %d held-out loss %.4f (raw %.4f)", job.stage, curve[-1]["step"], *losses.values())


def crash_once(marker: str, step: int) -> None:
    """Fault injection (:class:`workers.train.CrashOnce`): SIGKILL this process, unless ``marker`` says it happened."""
    if os.path.exists(marker):
        return
    with open(marker, "w") as file:
        file.write(str(step))
    os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- helpers


def learning_rate(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup from lr/warmup to lr over ``warmup_steps``, then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


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


def move_objective(objective: Objective, device: torch.device) -> None:
    """Move every module an objective holds (teacher, EMA target) to the worker's device."""
    for value in vars(objective).values():
        if isinstance(value, nn.Module):
            value.to(device)


class Timing:
    """Where rank 0's wall time goes, in seconds, stored with each checkpoint (``TrainResult.timing``).

    start_s: from ``fit`` on the driver to this loop's first line (controller, worker group,
    process group); setup_s: model, optimizer, resume, DDP wrap; data_s: the first pass over
    the shard; steps_s: the optimizer steps; heldout_s: the held-out loss at checkpoints;
    checkpoint_s: checkpoint commits and the report barrier (all but the last); until_last_step_s:
    ``fit`` to the last step. ``fit`` adds split_s (the driver reading and splitting a cached
    dataset, inside start_s) and teardown_s (the last commit, then the controller noticing the
    end and stopping the workers).
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
