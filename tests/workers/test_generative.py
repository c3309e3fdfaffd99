"""Base, reflow pairs, reflow and consistency stages on tiny synthetic latents, through the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from infra.config import ConsistencyConfig, ReflowConfig, Resources, TrainConfig
from infra.store import Store
from infra.tables import table_column_to_numpy, tensors_to_table
from models.consistency import consistency_sample
from workers.generative import run_base, run_consistency, run_pairs, run_reflow

pytestmark = pytest.mark.timeout(600)

SHAPE = (2, 4, 4)
TINY = dict(model="DiT-T/2", batch_size=16, lr=3e-3, warmup_steps=0, checkpoint_every=10,
            class_dropout=0.1, resources=Resources(num_workers=1, cpus_per_worker=1))


def commit_latents(store: Store, n: int = 64):
    """A latents table like the latents stage writes: two classes with different means."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    mean = rng.standard_normal((n, *SHAPE)).astype(np.float32) * 0.3 + np.where(labels, 1.0, -1.0)[:, None, None, None]
    table = tensors_to_table({"id": np.array([f"img{i}" for i in range(n)]), "split": np.array(["train"] * n),
                              "label": labels.astype(np.int64), "mean": mean,
                              "logvar": np.full((n, *SHAPE), -6.0, np.float32)})
    with store.begin("latents", "synthetic", config={"n": n}) as writer:
        writer.write_table("latents", table)
        return writer.commit(metrics={"latent_shape": list(SHAPE), "num_classes": 2, "latent_scale": 1.0, "n_train": n,
                                      "vae_ref": "vae/none"})


def test_base_reflow_consistency_chain(ray_local, tmp_path):
    store = Store.open(str(tmp_path / "store"))
    latents = commit_latents(store)

    base = run_base(store, TrainConfig(steps=20, **TINY), latents)
    assert base.metrics["sampler"] == "ode" and base.metrics["steps"] == 20
    assert {"model", "raw", "curve"} <= set(base.files)
    net = store.load_model(base, "model")
    assert net.num_classes == 2 and net.config.input_size == 4

    # Content addressing: the same config and inputs return the committed stage.
    assert run_base(store, TrainConfig(steps=20, **TINY), latents).ref == base.ref

    reflow_cfg = ReflowConfig(rounds=1, pairs=24, steps=4, solver="euler", batch_size=8,
                              train=TrainConfig(steps=10, **TINY))
    pairs = run_pairs(store, reflow_cfg, base, round_index=1)
    table = store.read_table(pairs, "pairs")
    x_0, x_1 = table_column_to_numpy(table, "x_0"), table_column_to_numpy(table, "x_1")
    assert x_0.shape == (24, *SHAPE) and x_1.shape == (24, *SHAPE)
    assert list(table.column("label").to_pylist()) == [i % 2 for i in range(24)]
    assert not np.allclose(x_0, x_1)
    # Per-row seeds: a second pairs stage with another actor batch size draws the same noise.
    again = run_pairs(store, reflow_cfg.model_copy(update={"batch_size": 5}), base, round_index=1)
    assert again.ref != pairs.ref
    np.testing.assert_allclose(table_column_to_numpy(store.read_table(again, "pairs"), "x_0"), x_0)
    # Readable without fewstep.
    frame = pd.read_parquet(store.file_path(pairs, "pairs"))
    assert len(frame) == 24 and {"x_0", "x_1", "label"} <= set(frame.columns)

    reflow = run_reflow(store, reflow_cfg, base, pairs, round_index=1)
    assert reflow.metrics["teacher_ref"] == base.ref and reflow.inputs == [base.ref, pairs.ref]

    consistency = run_consistency(store, ConsistencyConfig(intervals=4, train=TrainConfig(steps=10, **TINY)),
                                  reflow, pairs)
    assert consistency.metrics["sampler"] == "consistency"
    student = store.load_model(consistency, "model")
    x = consistency_sample(student, torch.randn(3, *SHAPE), torch.tensor([0, 1, 2]), steps=2).x_1
    assert x.shape == (3, *SHAPE) and torch.isfinite(x).all()
