"""The latents stage against the same work in a plain loop: images table -> VAE encoder -> Parquet.

    python benchmarks/latents_bench.py [--images 8192] [--batch-size 256] [--channels 1] [--json]

One run, same store, same images table (ingested from a synthetic Parquet source of distinct
noise PNGs), same untrained VAE (32 base channels, the default pipeline's), same batch size:

    plain   this process: read the table, decode each batch of PNGs, encode, write one Parquet
            file; torch's default threads
    stage   ``run_latents``: Ray Data reads the verified table, an actor pool of encoders
            (``--workers`` actors) encodes it, the driver streams the rows into Parquet

Throughput ratio = plain seconds / stage seconds (aim >= 0.9). ``--json`` prints one JSON
object last with ``throughput_ratio_stage_over_plain``.
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
            parts.append(tensors_to_table({
                "id": np.asarray(batch["id"].to_pylist()), "split": np.asarray(batch["split"].to_pylist()),
                "label": batch["label"].to_numpy(), "mean": posterior.mean.float().numpy(),
                "logvar": posterior.logvar.float().numpy()}))
    import pyarrow as pa

    data = table_to_parquet_bytes(pa.concat_tables(parts))
    with open(os.path.join(tempfile.gettempdir(), "latents-plain.parquet"), "wb") as out:
        out.write(data)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="encoder actors")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from infra.config import IngestConfig, LatentsConfig, Resources
    from infra.store import Store
    from workers.runtime import ensure_ray
    from workers.stages.s01_ingest import run_ingest
    from workers.stages.s03_latents import run_latents

    root = tempfile.mkdtemp(prefix="fewstep-latents-bench-")
    source = image_parquet(os.path.join(root, "source"), args.images, size=args.image_size, channels=3)
    store = Store.open(os.path.join(root, "store"))
    ensure_ray(verbose=False)
    images = run_ingest(store, IngestConfig(source=source, image_size=args.image_size, channels=args.channels))
    vae = commit_vae(store, channels=args.channels, image_size=args.image_size)

    plain_s = plain(store, images, vae, args.batch_size, args.channels)
    threads = torch.get_num_threads()
    started = time.perf_counter()
    manifest = run_latents(store, LatentsConfig(batch_size=args.batch_size, resources=Resources(workers=args.workers)),
                           images, vae)
    stage_s = time.perf_counter() - started
    rows = manifest.metrics.get("n_latents", args.images)

    print(f"{rows} images {args.image_size}x{args.image_size}x{args.channels}, batch {args.batch_size}, "
          f"{os.cpu_count()} cores, plain torch threads {threads}, {args.workers} encoder actor(s)")
    print(f"plain loop          {plain_s:8.2f} s  ({rows / plain_s:8.1f} images/s)")
    print(f"latents stage       {stage_s:8.2f} s  ({rows / stage_s:8.1f} images/s)")
    print(f"throughput stage / plain  {plain_s / stage_s:.2f}x")
    if args.json:
        print(json.dumps({"images": rows, "batch_size": args.batch_size, "workers": args.workers,
                          "plain_s": round(plain_s, 3), "stage_s": round(stage_s, 3), "plain_threads": threads,
                          "throughput_ratio_stage_over_plain": round(plain_s / stage_s, 3)}))


if __name__ == "__main__":
    main()
