"""The reflow pairs stage against the same work in a plain loop: noise -> teacher ODE -> Parquet.

    python benchmarks/pairs_bench.py [--sizes 2048,8192] [--steps 8] [--batch-size 512] [--json]

One run, same untrained teacher (DiT-T/2 on 4x4x4 latents, the default pipeline's), same
seeded noise per row, solver (Heun), steps and batch size:

    plain   this process: seeded x_0 per row, ``sample_ode``, one Parquet file; torch's default threads
    stage   ``run_pairs``: ``ray.data.range`` -> an actor pool of samplers (``--workers``) -> Ray Data
            tasks writing ordered parts into the store

At two sizes (after an untimed tiny run that warms Ray up), so the fixed cost and the per-pair rate come apart (see latents_bench.py).
``--json`` prints one JSON object last with ``throughput_ratio_stage_over_plain`` (per-pair
rates; aim >= 0.9) and ``whole_ratio_stage_over_plain`` (at the larger size).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench_data import commit_generator, commit_vae  # noqa: E402


def plain(store, teacher, pairs: int, steps: int, batch_size: int, solver: str) -> float:
    import numpy as np
    import pyarrow as pa
    import torch

    from infra.cards import GeneratorCard
    from infra.tables import table_to_parquet_bytes, tensors_to_table
    from models.samplers import sample_ode
    from workers.generator import load_network, seeded_normal

    started = time.perf_counter()
    space = GeneratorCard.from_manifest(teacher).space
    model = load_network(store, teacher)
    parts = []
    with torch.no_grad():
        for start in range(0, pairs, batch_size):
            ids = np.arange(start, min(pairs, start + batch_size))
            x_0 = seeded_normal(18, ids, space.latent_shape)[0]  # (B, C, H, W)
            y = torch.as_tensor(ids % space.num_classes)
            x_1 = sample_ode(model, x_0, y, steps, solver, 1.0).x_1
            parts.append(tensors_to_table({"id": ids, "label": y.numpy(), "x_0": x_0.numpy(), "x_1": x_1.numpy()}))
    data = table_to_parquet_bytes(pa.concat_tables(parts))
    with open(os.path.join(tempfile.gettempdir(), "pairs-plain.parquet"), "wb") as out:
        out.write(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,8192", help="two pair counts")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=1, help="sampler actors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from infra.config import PairsConfig, Resources
    from infra.store import Store
    from workers.runtime import ensure_ray
    from workers.stages.s05_pairs import run_pairs

    store = Store.open(os.path.join(tempfile.mkdtemp(prefix="fewstep-pairs-bench-"), "store"))
    teacher = commit_generator(store, commit_vae(store), family="flow")
    ensure_ray(verbose=False)
    runs = {}
    sizes = [int(s) for s in args.sizes.split(",")]
    for n in (min(256, sizes[0]), *sizes):  # the first, tiny run warms Ray Data and the actor code up
        plain_s = plain(store, teacher, n, args.steps, args.batch_size, args.solver)
        started = time.perf_counter()
        run_pairs(
            store,
            PairsConfig(
                pairs=n,
                steps=args.steps,
                guidance=1.0,
                solver=args.solver,
                batch_size=args.batch_size,
                resources=Resources(workers=args.workers),
            ),
            teacher,
            round_index=1,
        )
        runs[n] = (plain_s, time.perf_counter() - started)
        print(f"{n:7d} pairs: plain {plain_s:7.2f} s, stage {runs[n][1]:7.2f} s", flush=True)
    (n1, (p1, s1)), (n2, (p2, s2)) = ((n, runs[n]) for n in sizes)
    plain_rate, stage_rate = (n2 - n1) / (p2 - p1), (n2 - n1) / (s2 - s1)
    fixed = s1 - n1 / stage_rate

    print(
        f"{args.solver} {args.steps} steps, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"plain torch threads {torch.get_num_threads()}, {args.workers} sampler actor(s)"
    )
    print(
        f"per-pair rate: plain {plain_rate:8.1f} pairs/s, stage {stage_rate:8.1f} pairs/s, "
        f"ratio {stage_rate / plain_rate:.2f}x; stage fixed cost ~{fixed:.1f} s"
    )
    print(f"whole stage at {n2}: {p2 / s2:.2f}x the plain loop's throughput")
    if args.json:
        print(
            json.dumps(
                {
                    "sizes": [n1, n2],
                    "steps": args.steps,
                    "solver": args.solver,
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "plain_s": [round(p1, 3), round(p2, 3)],
                    "stage_s": [round(s1, 3), round(s2, 3)],
                    "plain_pairs_per_s": round(plain_rate, 1),
                    "stage_pairs_per_s": round(stage_rate, 1),
                    "stage_fixed_s": round(fixed, 2),
                    "plain_threads": torch.get_num_threads(),
                    "throughput_ratio_stage_over_plain": round(stage_rate / plain_rate, 3),
                    "whole_ratio_stage_over_plain": round(p2 / s2, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
