"""Ray Train stage vs a plain PyTorch loop: the same model, objective, data and steps, side by side.

    python benchmarks/train_bench.py [--steps 300] [--batch-size 64] [--model DiT-T/2]

Prints seconds for each contender and their ratio. The Ray side is ``workers.train.fit``
(worker group start, dataset shard, checkpoints in a local store); the plain side is the
same ``objective.loss`` / ``backward`` / ``step`` / EMA loop in this process. The
difference is what fewstep pays for fault tolerance and scale-out on one machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def rows(n: int, shape: tuple[int, ...], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x_0": rng.standard_normal(shape).astype(np.float32),
             "x_1": rng.standard_normal(shape).astype(np.float32), "label": int(i % 10)} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="DiT-T/2")
    parser.add_argument("--rows", type=int, default=2048)
    args = parser.parse_args()

    import ray

    from infra.config import GeneratorConfig
    from infra.store import Store
    from models.dit import DiT, dit_config
    from models.ema import ema_update
    from models.objectives import FlowMatching
    from models.registry import build_model, model_spec
    from workers.batches import PairBatch
    from workers.train import TrainJob, fit

    shape = (4, 8, 8)
    data = rows(args.rows, shape)
    torch.manual_seed(0)
    spec = model_spec(DiT(dit_config(args.model, input_size=8, in_channels=4, num_classes=10, class_dropout_prob=0.0)))
    config = GeneratorConfig(model=args.model, steps=args.steps, batch_size=args.batch_size, lr=1e-3, warmup_steps=0,
                             checkpoint_every=max(1, args.steps // 3))
    adapt = PairBatch(num_classes=10)

    # Plain PyTorch: the loop's arithmetic, nothing else.
    model = build_model(spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    objective = FlowMatching(label_dropout=0.1)
    tensors = {k: torch.as_tensor(np.stack([r[k] for r in data])) for k in ("x_0", "x_1", "label")}
    started = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, args.rows, (args.batch_size,))
        batch = adapt({k: v[index] for k, v in tensors.items()})
        loss = objective.loss(model, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema_update(ema, model, config.ema_decay)
    plain = time.perf_counter() - started

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(os.path.join(folder, "store"))
        job = TrainJob(store=store, stage="bench", key="k", model_spec=spec, objective=FlowMatching(label_dropout=0.1),
                       config=config, adapt_batch=adapt)
        started = time.perf_counter()
        fit(job, ray.data.from_items(data), storage_path=os.path.join(folder, "ray"))
        staged = time.perf_counter() - started
    ray.shutdown()

    print(f"model {args.model}, {args.steps} steps, batch {args.batch_size}, torch threads {torch.get_num_threads()}")
    print(f"plain PyTorch loop      {plain:8.2f} s  ({args.steps / plain:6.1f} steps/s)")
    print(f"Ray Train stage (fit)   {staged:8.2f} s  ({args.steps / staged:6.1f} steps/s)")
    print(f"ratio Ray / plain       {staged / plain:8.2f}x  (fixed overhead ~{staged - plain:.1f} s)")


if __name__ == "__main__":
    main()
