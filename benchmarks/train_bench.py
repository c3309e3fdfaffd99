"""Ray Train stage vs a plain PyTorch loop: the same model, objective, data and steps, side by side.

    python benchmarks/train_bench.py [--steps 300] [--batch-size 64] [--model DiT-T/2] [--warm] [--json]

Prints seconds for each contender and their ratio. The Ray side is ``workers.train.fit``
(a Ray Train ``TorchTrainer``: controller, worker group, gloo process group, the dataset
read once and split, checkpoints committed to a local store); the plain side is the same
``objective.loss`` / ``backward`` / ``step`` / EMA loop in this process, with torch's default
threads. The difference is what fewstep pays for fault tolerance and scale-out on one
machine. ``--warm`` times a second ``fit`` on the same Ray (what every training stage after
the first one of a pipeline pays). The Ray side's own breakdown (``TrainResult.timing``) says
where its time went.

The local contender is the same ``fit`` with ``resources.workers: 0``: Ray Train's local mode,
the loop run in this process through the same ``ray.train`` API (no worker group to start).

``--json`` prints one JSON object last, with ``ratio_ray_over_plain`` and ``ratio_local_over_plain``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def rows(n: int, shape: tuple[int, ...], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "x_0": rng.standard_normal(shape).astype(np.float32),
            "x_1": rng.standard_normal(shape).astype(np.float32),
            "label": int(i % 10),
        }
        for i in range(n)
    ]


def plain_loop(spec: dict, config, data: list[dict], adapt) -> float:
    """The loop's arithmetic and nothing else; returns seconds."""
    from models.ema import ema_update
    from models.objectives import FlowMatching
    from models.registry import build_model

    model = build_model(spec)
    ema = copy.deepcopy(model).requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    objective = FlowMatching(label_dropout=0.1)
    tensors = {k: torch.as_tensor(np.stack([r[k] for r in data])) for k in ("x_0", "x_1", "label")}
    started = time.perf_counter()
    for _ in range(config.steps):
        index = torch.randint(0, len(data), (config.batch_size,))
        batch = adapt({k: v[index] for k, v in tensors.items()})
        loss = objective.loss(model, batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        ema_update(ema, model, config.ema_decay)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--model", default="DiT-T/2")
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs of the local Ray (as fewstep starts it)")
    parser.add_argument("--warm", action="store_true", help="also time a second fit on the same Ray")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on both sides (default: torch's in the plain loop, fewstep's rule in Ray)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    args = parser.parse_args()

    import ray

    from infra.config import GeneratorConfig, Resources
    from infra.store import Store
    from models.dit import DiT, dit_config
    from models.objectives import FlowMatching
    from models.registry import model_spec
    from workers.batches import PairBatch
    from workers.train import TrainJob, fit

    shape = (4, 8, 8)
    data = rows(args.rows, shape)
    torch.manual_seed(0)
    spec = model_spec(DiT(dit_config(args.model, input_size=8, in_channels=4, num_classes=10)))
    config = GeneratorConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=1e-3,
        warmup_steps=0,
        checkpoint_every=max(1, args.steps // 3),
    )
    adapt = PairBatch(num_classes=10)

    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["FEWSTEP_TORCH_THREADS"] = str(args.threads)
    plain = plain_loop(spec, config, data, adapt)
    plain_threads = torch.get_num_threads()

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    fits = []
    with tempfile.TemporaryDirectory() as folder:
        store = Store.open(os.path.join(folder, "store"))
        local = config.model_copy(update={"resources": Resources(workers=0)})
        for key in ("cold", "warm", "local") if args.warm else ("cold", "local"):
            job = TrainJob(
                store=store,
                stage="bench",
                key=key,
                model_spec=spec,
                objective=FlowMatching(label_dropout=0.1),
                config=local if key == "local" else config,
                adapt_batch=adapt,
            )
            started = time.perf_counter()
            result = fit(job, ray.data.from_items(data), storage_path=os.path.join(folder, "ray"))
            fits.append(
                (key, time.perf_counter() - started, getattr(result, "timing", {}), getattr(result, "threads", 0))
            )
    # The plain loop once more, with Ray's processes (GCS, raylet, this driver's core-worker
    # threads) now running on the same cores: what the loop loses to Ray being there at all.
    plain_with_ray = plain_loop(spec, config, data, adapt)
    ray.shutdown()

    print(
        f"model {args.model}, {args.steps} steps, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"plain loop torch threads {plain_threads}"
    )
    print(f"plain PyTorch loop      {plain:8.2f} s  ({args.steps / plain:6.1f} steps/s)")
    print(
        f"plain loop, Ray up      {plain_with_ray:8.2f} s  ({args.steps / plain_with_ray:6.1f} steps/s); "
        f"ratio {plain_with_ray / plain:.2f}x"
    )
    for key, seconds, timing, threads in fits:
        name = "Ray Train local mode " if key == "local" else f"Ray Train stage ({key})"
        print(
            f"{name}  {seconds:8.2f} s  ({args.steps / seconds:6.1f} steps/s, worker torch threads "
            f"{threads or '?'}); ratio {seconds / plain:.2f}x, fixed ~{seconds - plain:.1f} s"
        )
        if timing:
            print("    " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    if args.json:
        cold = fits[0]
        out = {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "model": args.model,
            "cores": os.cpu_count(),
            "plain_s": round(plain, 3),
            "plain_threads": plain_threads,
            "plain_with_ray_s": round(plain_with_ray, 3),
            "ratio_plain_with_ray_over_plain": round(plain_with_ray / plain, 3),
            "ray_s": round(cold[1], 3),
            "ray_threads": cold[3],
            "ratio_ray_over_plain": round(cold[1] / plain, 3),
            "timing": cold[2],
            "local_s": round(fits[-1][1], 3),
            "ratio_local_over_plain": round(fits[-1][1] / plain, 3),
            "timing_local": fits[-1][2],
        }
        if args.warm:
            out.update(
                ray_warm_s=round(fits[1][1], 3),
                ratio_warm_over_plain=round(fits[1][1] / plain, 3),
                timing_warm=fits[1][2],
            )
        print(json.dumps(out))


if __name__ == "__main__":
    main()
