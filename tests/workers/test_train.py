"""The one training loop on a real local Ray: checkpoints, resume after a killed worker, EMA restored."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from infra.config import LoopConfig, Resources
from infra.store import Store
from models.dit import DiT, dit_config
from models.objectives import FlowMatching
from models.registry import model_spec
from workers.batches import PairBatch
from workers.runtime import machine_cores, worker_threads
from workers.train import CrashOnce, TrainJob, fit

pytestmark = pytest.mark.timeout(300)

BATCH = 8
EPOCH_BATCHES = 5
CHECKPOINT_EVERY = 4  # not a multiple of the epoch: the kill lands mid-epoch


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x_0": rng.standard_normal((2, 4, 4)).astype(np.float32),
            "x_1": rng.standard_normal((2, 4, 4)).astype(np.float32) * 0.5 + 1.0,
            "label": int(i % 3),
        }
        for i in range(n)
    ]


def tiny_spec() -> dict:
    torch.manual_seed(0)
    return model_spec(
        DiT(
            dit_config(
                "DiT-T/2",
                input_size=4,
                in_channels=2,
                num_classes=3,
                hidden_size=32,
                depth=1,
                num_heads=2,
            )
        )
    )


def job_for(store: Store, key: str, steps: int, crash: CrashOnce | None = None, workers: int = 1) -> TrainJob:
    config = LoopConfig(
        steps=steps,
        batch_size=BATCH,
        lr=3e-3,
        warmup_steps=2,
        checkpoint_every=CHECKPOINT_EVERY,
        ema_decay=0.9,
        seed=3,
        resources=Resources(workers=workers),
    )
    return TrainJob(
        store=store,
        stage="unit",
        key=key,
        model_spec=tiny_spec(),
        objective=FlowMatching(label_dropout=0.0),
        config=config,
        adapt_batch=PairBatch(num_classes=3),
        crash=crash,
        log_every=5,
    )


def dataset(ray_local):
    return ray_local.data.from_items(pair_rows(BATCH * EPOCH_BATCHES), override_num_blocks=2)


def test_fit_trains_and_checkpoints(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    result = fit(job_for(store, "plain", steps=15), dataset(ray_local), storage_path=str(tmp_path / "ray"))
    assert result.step == 15
    assert [point["step"] for point in result.curve] == [5, 10, 15]  # log_every=5
    assert result.curve[-1]["loss"] < result.curve[0]["loss"], result.curve
    assert store.checkpoints("unit", "plain").latest().step == 15
    # One worker holding 1 of the local cluster's 4 logical CPUs runs on every core of this
    # machine: the shard was read before training, so Ray Data needs none meanwhile.
    assert result.threads == min(machine_cores(), 4), result
    assert {"start_s", "setup_s", "data_s", "steps_s", "checkpoint_s", "teardown_s"} <= set(result.timing), (
        result.timing
    )
    # A second fit on a finished key returns the stored result without training.
    again = fit(job_for(store, "plain", steps=15), dataset(ray_local), storage_path=str(tmp_path / "ray"))
    assert all(torch.equal(again.ema_state[k], result.ema_state[k]) for k in result.ema_state)


def test_local_mode_trains_in_this_process_to_the_weights_one_worker_reaches(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    worker = fit(job_for(store, "worker", steps=10), dataset(ray_local), storage_path=str(tmp_path / "ray"))
    torch.set_num_threads(1)  # the driver's own setting, whatever the loop runs with
    try:
        local = fit(
            job_for(store, "local", steps=10, workers=0), dataset(ray_local), storage_path=str(tmp_path / "ray")
        )
        assert torch.get_num_threads() == 1, "local mode left the driver's torch threads changed"
    finally:
        torch.set_num_threads(machine_cores())
    assert local.step == 10 and store.checkpoints("unit", "local").latest().step == 10
    assert [p["step"] for p in local.curve] == [p["step"] for p in worker.curve]
    # Same seed, same shard order, same single rank: the same run, only without a worker actor.
    for name, value in worker.ema_state.items():
        torch.testing.assert_close(local.ema_state[name], value, rtol=1e-5, atol=1e-6, msg=f"EMA {name}")


def test_killed_worker_resumes_from_checkpoint_with_ema(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    reference = fit(job_for(store, "reference", steps=15), dataset(ray_local), storage_path=str(tmp_path / "ray"))

    marker = tmp_path / "crashed"
    crashed = fit(
        job_for(store, "crashed", steps=15, crash=CrashOnce(step=11, marker=str(marker))),
        dataset(ray_local),
        storage_path=str(tmp_path / "ray"),
    )

    assert marker.exists(), "the worker was never killed"
    assert crashed.step == 15
    assert crashed.resumed_from == 8  # the last checkpoint before the kill, 3 batches into epoch 2
    # Model, EMA, optimizer, RNG and the place in the epoch were restored: the resumed run
    # replays the uninterrupted one exactly.
    for name, value in reference.ema_state.items():
        torch.testing.assert_close(crashed.ema_state[name], value, rtol=1e-5, atol=1e-6, msg=f"EMA {name}")
    for name, value in reference.model_state.items():
        torch.testing.assert_close(crashed.model_state[name], value, rtol=1e-5, atol=1e-6, msg=f"model {name}")


@pytest.mark.timeout(60)
def test_a_worker_group_that_would_starve_ray_data_is_refused_not_hung(ray_local, tmp_path):
    """Streamed shards are read while the workers train: workers holding every CPU would hang."""
    store = Store.open(str(tmp_path / "store"))
    job = job_for(store, "starved", steps=5)
    greedy = job.config.model_copy(update={"resources": Resources(workers=2, cpus=2), "cache_data": False})
    job = dataclasses.replace(job, config=greedy)
    with pytest.raises(ValueError, match=r"Ray Data needs at least 1 more"):
        fit(job, dataset(ray_local), storage_path=str(tmp_path / "ray"))


def test_a_cached_shard_lets_the_workers_hold_every_cpu(ray_local, tmp_path):
    """Cached shards are read before the workers start: a worker may hold the whole cluster."""
    store = Store.open(str(tmp_path / "store"))
    job = job_for(store, "whole", steps=5)
    job = dataclasses.replace(job, config=job.config.model_copy(update={"resources": Resources(workers=1, cpus=4)}))
    result = fit(job, dataset(ray_local), storage_path=str(tmp_path / "ray"))
    assert result.step == 5 and result.threads == min(machine_cores(), 4)


@pytest.mark.parametrize(
    "cpus, workers, data_cores, local_cores, threads",
    [
        (1, 1, 0, None, 1),  # a cluster of several nodes: exactly the CPUs held (Ray's OMP_NUM_THREADS)
        (2.5, 1, 0, None, 2),
        (0.5, 1, 0, None, 1),
        (1, 1, 0, 2, 2),  # alone on a 2-core machine, data read before: both cores
        (1, 1, 1, 2, 1),  # data streamed alongside: one core left to it
        (1, 2, 0, 8, 4),  # two workers share 8 cores
        (1, 3, 1, 8, 2),
        (6, 1, 0, 4, 4),  # never more threads than the machine has cores
        (3, 4, 0, 8, 3),  # never fewer than the CPUs held
    ],
)
def test_worker_threads(cpus, workers, data_cores, local_cores, threads):
    assert worker_threads(cpus, workers, data_cores, local_cores) == threads


def test_workers_with_several_threads_spin_briefly_then_sleep(monkeypatch):
    from workers.runtime import threads_for, worker_env

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert worker_env(1) == {} and worker_env(2) == {"GOMP_SPINCOUNT": "1000"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # the user's choice wins
    assert worker_env(4) == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    assert worker_env(4) == {"GOMP_SPINCOUNT": "300000"}
    monkeypatch.setenv("FEWSTEP_TORCH_THREADS", "3")
    assert threads_for(1, 1, 0) == 3
    monkeypatch.setenv("FEWSTEP_TORCH_THREADS", "many")
    with pytest.raises(ValueError, match="FEWSTEP_TORCH_THREADS='many' must be a positive integer"):
        threads_for(1, 1, 0)
