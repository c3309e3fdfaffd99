"""The one training loop of fewstep: the driver side, :func:`fit`.

Every trained model (the VAE, the evaluation classifier, the base flow model, each reflow
round, the consistency student) goes through :func:`fit`. The stage hands it a
:class:`TrainJob`: a model spec, an optional warm start, a batch adapter and an
:class:`~models.objectives.Objective`; the loop never knows which stage it serves.
``fit`` starts a Ray Train ``TorchTrainer`` whose workers run :mod:`workers.train_loop`
(set up, resume, epochs, checkpoints), then reads the final checkpoint back
(:mod:`workers.train_state` names what a checkpoint holds):

- DDP over ``resources.workers`` (gloo on CPU, NCCL on GPU, chosen by Ray), bf16 autocast on
  GPU; ``batch_size`` is the global batch, each worker takes its share;
- checkpoints (model, EMA, optimizer, objective state, step, RNG, curve) committed to the
  artifact store every ``checkpoint_every`` steps, each with the held-out loss of the EMA and raw
  weights in the curve when the stage hands the job a held-out set (:mod:`workers.heldout`). A
  run restarted by Ray after a worker died, or a stage re-run after the driver died, resumes
  from the latest one.

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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import ray
import ray.train
import ray.train.torch
import torch
from torch import Tensor

from infra.config import ConfigError, LoopConfig, Resources
from infra.store import Store
from models.objectives import Objective
from workers import progress
from workers.data import order_preserving_options
from workers.heldout import HeldOut
from workers.parts import ordered
from workers.runtime import threads_for, worker_env, worker_resources
from workers.train_loop import train_loop_per_worker
from workers.train_state import LoopState, weights

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default),
# and a worker's ray.train.report waits for the next poll to take it: every checkpoint, and the
# end of every run, waited about a second for it (BENCHMARKS.md, "Training"). A poll is one small
# actor call per worker; 0.2 s keeps that under 1% of a core. Set the variable to override.
POLL_ENV, POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2"

log = logging.getLogger("fewstep.train")

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
        return self.config.batch_size // self.config.ranks


@dataclass
class TrainResult:
    step: int
    model_state: dict[str, Tensor]
    ema_state: dict[str, Tensor]
    curve: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    nodes: list[str] = field(default_factory=list)  # the Ray node of each rank in the last attempt
    threads: int = 0  # torch threads rank 0 ran (0: not recorded)
    timing: dict[str, float] = field(default_factory=dict)  # where rank 0's wall time went (workers.train_loop.Timing)

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
        local = resources.workers == 0
        if local:  # Ray Train's local mode: the loop runs here, through the same ray.train API
            scaling = ray.train.ScalingConfig(num_workers=0)
            log.info("%s: Ray Train local mode (in this process; no worker restart after a crash)", job.stage)
        else:
            scaling = ray.train.ScalingConfig(
                num_workers=resources.workers,
                use_gpu=resources.gpus > 0,
                resources_per_worker=worker_resources(resources),  # custom resources pin it to their nodes
            )
        threads = threads_for(resources.cpus, job.config.ranks, data_cores=0 if cached else 1)
        run_config = ray.train.RunConfig(
            name=f"fewstep-{job.stage}-{job.key[:12]}",
            storage_path=storage_path or os.path.join(os.path.expanduser("~"), "ray_results"),
            # Ray restarts the worker group after a crash; the loop resumes from the store.
            failure_config=ray.train.FailureConfig(max_failures=3),
            worker_runtime_env={"env_vars": worker_env(threads)},
        )
        # Cached: read once here, one ordered shard per rank; streamed: Ray Train splits it per epoch.
        split_started = time.perf_counter()
        shards = split_once(dataset, job.config.ranks) if cached else None
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
            driver_threads = torch.get_num_threads()
            try:
                trainer.fit()
            finally:  # local mode set this process's torch threads for the loop
                torch.set_num_threads(driver_threads)
        latest = checkpoints.latest()
    if latest is None or latest.step < job.config.steps:
        raise RuntimeError(f"{job.stage}: training ended without a final checkpoint (latest={latest and latest.step})")
    state = LoopState.of(latest)
    timing = state.timing
    if timing and split_s is not None:  # trained just now (not returned from an earlier run's checkpoint)
        timing["teardown_s"] = round(time.time() - started - timing.get("until_last_step_s", 0.0), 3)
        timing["split_s"] = round(split_s, 3)
    model_state, ema_state = weights(latest)
    return TrainResult(
        step=state.step,
        model_state=model_state,
        ema_state=ema_state,
        curve=state.curve,
        resumed_from=state.resumed_from,
        nodes=state.nodes,
        threads=state.threads,
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
    workers = config.ranks
    per_worker, share = rows // workers, config.batch_size // workers
    if per_worker < share:
        raise ConfigError(
            f"{stage}: {rows} training rows give each of {workers} workers {per_worker}, fewer than its share "
            f"{share} of batch_size={config.batch_size}; lower {stage}.batch_size, or add data"
        )
