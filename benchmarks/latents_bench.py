"""The latents stage against the same work in a plain loop: images table -> VAE encoder -> Parquet.

    python benchmarks/latents_bench.py [--sizes 4096,16384] [--batch-size 256] [--channels 1] [--json]

One run, same store, same images tables (ingested from a synthetic Parquet source of distinct
noise PNGs, the first N by id for each size), same untrained VAE (32 base channels, the
default pipeline's), same batch size:

    plain   this process: read the table, decode each batch of PNGs, encode, write one Parquet
            file; torch's default threads
    stage   ``run_latents``: Ray Data reads the verified table, an actor pool of encoders
            (``--workers`` actors) encodes it, the driver streams the rows into Parquet

At two sizes, so the fixed cost (starting the actor pool, Ray Data's planning) and the
per-image rate come apart: rate = (N2 - N1) / (t2 - t1) for each contender, and the stage's
fixed cost = t1 - N1 / rate. A tiny untimed run first warms Ray up. ``--json`` prints one JSON object last with
``throughput_ratio_stage_over_plain`` (the ratio of the per-image rates; aim >= 0.9) and
``whole_ratio_stage_over_plain`` (plain seconds / stage seconds at the larger size).
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

from bench_data import commit_vae, image_parquet  # noqa: E402


def plain(store, images, vae_manifest, batch_size: int, channels: int) -> float:
    import numpy as np
    import torch

    from infra.tables import table_to_parquet_bytes, tensors_to_table
    from workers.pixels import decode_batch

    started = time.perf_counter()
    vae = store.load_model(vae_manifest, "vae").eval()
    table = store.read_table(images, "images", columns=["id", "split", "label", "image"])
    parts = []
    with torch.inference_mode():
        for start in range(0, table.num_rows, batch_size):
            batch = table.slice(start, batch_size)
            x = torch.from_numpy(decode_batch(batch["image"].to_pylist(), channels))  # (N, C, H, W)
            posterior = vae.encode(x)
            parts.append(
                tensors_to_table(
                    {
                        "id": np.asarray(batch["id"].to_pylist()),
                        "split": np.asarray(batch["split"].to_pylist()),
                        "label": batch["label"].to_numpy(),
                        "mean": posterior.mean.float().numpy(),
                        "logvar": posterior.logvar.float().numpy(),
                    }
                )
            )
    import pyarrow as pa

    data = table_to_parquet_bytes(pa.concat_tables(parts))
    with open(os.path.join(tempfile.gettempdir(), "latents-plain.parquet"), "wb") as out:
        out.write(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,16384", help="two image counts")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="encoder actors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from infra.cards import ImagesCard
    from infra.config import IngestConfig, LatentsConfig, Resources
    from infra.store import Store
    from workers.runtime import ensure_ray
    from workers.stages.s01_ingest import run_ingest
    from workers.stages.s03_latents import run_latents

    small, large = (int(n) for n in args.sizes.split(","))
    root = tempfile.mkdtemp(prefix="fewstep-latents-bench-")
    source = image_parquet(os.path.join(root, "source"), large, size=args.image_size, channels=3)
    store = Store.open(os.path.join(root, "store"))
    ensure_ray(verbose=False)
    vae = commit_vae(store, channels=args.channels, image_size=args.image_size)
    runs = {}
    for n in (min(256, small), small, large):  # the first, tiny run warms Ray Data and the actor code up
        images = run_ingest(
            store, IngestConfig(source=source, image_size=args.image_size, channels=args.channels, limit=n)
        )
        rows = ImagesCard.from_manifest(images).n_images
        plain_s = plain(store, images, vae, args.batch_size, args.channels)
        started = time.perf_counter()
        run_latents(
            store, LatentsConfig(batch_size=args.batch_size, resources=Resources(workers=args.workers)), images, vae
        )
        runs[n] = (rows, plain_s, time.perf_counter() - started)
        print(f"{rows:7d} images: plain {plain_s:7.2f} s, stage {runs[n][2]:7.2f} s", flush=True)
    (n1, p1, s1), (n2, p2, s2) = runs[small], runs[large]
    plain_rate, stage_rate = (n2 - n1) / (p2 - p1), (n2 - n1) / (s2 - s1)
    fixed = s1 - n1 / stage_rate

    print(
        f"images {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}, {os.cpu_count()} cores, "
        f"plain torch threads {torch.get_num_threads()}, {args.workers} encoder actor(s)"
    )
    print(
        f"per-image rate: plain {plain_rate:8.1f} images/s, stage {stage_rate:8.1f} images/s, "
        f"ratio {stage_rate / plain_rate:.2f}x; stage fixed cost ~{fixed:.1f} s"
    )
    print(f"whole stage at {n2}: {p2 / s2:.2f}x the plain loop's throughput")
    if args.json:
        print(
            json.dumps(
                {
                    "sizes": [n1, n2],
                    "batch_size": args.batch_size,
                    "workers": args.workers,
                    "plain_s": [round(p1, 3), round(p2, 3)],
                    "stage_s": [round(s1, 3), round(s2, 3)],
                    "plain_images_per_s": round(plain_rate, 1),
                    "stage_images_per_s": round(stage_rate, 1),
                    "stage_fixed_s": round(fixed, 2),
                    "plain_threads": torch.get_num_threads(),
                    "throughput_ratio_stage_over_plain": round(stage_rate / plain_rate, 3),
                    "whole_ratio_stage_over_plain": round(p2 / s2, 3),
                }
            )
        )


if __name__ == "__main__":
    main()
