"""Ingest -> latents as the dataset grows: rows/s and the driver's peak memory at each size.

    python benchmarks/stream_bench.py [--sizes 10000,100000] [--image-size 16] [--json]

For each size N, one fresh process (so its peak memory is its own) runs the ingest stage on a
Parquet source of N distinct RGB noise PNGs (content ids, so the stage sorts and deduplicates
them: its heaviest path), then the latents stage with an untrained VAE. It reports seconds,
rows/s and the driver's peak resident memory (VmHWM) and its memory right after starting Ray,
the growth being what the stages added. Flat driver memory across sizes is the aim. If the
built-in procedural set exists (``workers.sources.shapes``), ``--source shapes`` uses it.

``--json`` prints one JSON object last: per size the seconds, rows/s and ``driver_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def one_size(n: int, source: str, image_size: int, channels: int, root: str) -> dict:
    """Runs in its own process: ingest + latents at size n; returns the figures."""
    from bench_data import MemoryPeaks, commit_vae, peak_rss_mb, rss_mb

    from infra.cards import ImagesCard
    from infra.config import IngestConfig, LatentsConfig
    from infra.store import Store
    from workers.runtime import ensure_ray
    from workers.stages.s01_ingest import run_ingest
    from workers.stages.s03_latents import run_latents

    store = Store.open(os.path.join(root, "store"))
    ensure_ray(verbose=False)
    started_rss = rss_mb()
    config = IngestConfig(
        source=source, image_size=image_size, channels=channels, limit=n if source == "shapes" else None
    )
    t = time.perf_counter()
    with MemoryPeaks() as ingest_peaks:
        images = run_ingest(store, config)
    ingest_s = time.perf_counter() - t
    ingest_rss = peak_rss_mb()
    vae = commit_vae(store, channels=channels, image_size=image_size)
    t = time.perf_counter()
    with MemoryPeaks() as latents_peaks:
        run_latents(store, LatentsConfig(), images, vae)
    latents_s = time.perf_counter() - t
    rows = ImagesCard.from_manifest(images).n_images
    return {
        "n": n,
        "rows": rows,
        "ingest_s": round(ingest_s, 2),
        "latents_s": round(latents_s, 2),
        "ingest_rows_per_s": round(rows / ingest_s, 1),
        "latents_rows_per_s": round(rows / latents_s, 1),
        "driver_rss_mb": round(peak_rss_mb(), 1),
        "driver_rss_after_ray_mb": round(started_rss, 1),
        "driver_rss_after_ingest_mb": round(ingest_rss, 1),
        # the driver's own heap (anon) apart from object-store pages it mapped in (shmem)
        "ingest_anon_peak_mb": round(ingest_peaks.mb["anon"], 1),
        "ingest_shmem_peak_mb": round(ingest_peaks.mb["shmem"], 1),
        "latents_anon_peak_mb": round(latents_peaks.mb["anon"], 1),
        "latents_shmem_peak_mb": round(latents_peaks.mb["shmem"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--channels", type=int, default=3)
    parser.add_argument("--source", choices=("parquet", "shapes"), default="parquet")
    parser.add_argument(
        "--data",
        default=os.path.join(tempfile.gettempdir(), "fewstep-stream-bench"),
        help="where the generated sources are kept (reused across runs)",
    )
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # n, source: the per-size child
    args = parser.parse_args()

    if args.one:
        n, source = int(args.one[0]), args.one[1]
        with tempfile.TemporaryDirectory() as root:
            print(json.dumps(one_size(n, source, args.image_size, args.channels, root)))
        return

    from bench_data import image_parquet

    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        if args.source == "shapes":
            source = "shapes"
        else:
            t = time.perf_counter()
            source = image_parquet(os.path.join(args.data, f"rgb{args.image_size}-{n}"), n, size=args.image_size)
            print(f"source of {n} images ready in {time.perf_counter() - t:.1f} s", flush=True)
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                str(n),
                source,
                "--image-size",
                str(args.image_size),
                "--channels",
                str(args.channels),
            ],
            capture_output=True,
            text=True,
        )
        if out.returncode != 0:
            raise RuntimeError(f"size {n} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{"))))
        print(results[-1], flush=True)

    print()
    print(
        "| images | ingest s | ingest rows/s | latents s | latents rows/s | driver peak RSS MiB "
        "| after ray.init | peak after ingest | heap peak ingest / latents | object-store pages ingest / latents |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['rows']} | {r['ingest_s']} | {r['ingest_rows_per_s']} | {r['latents_s']} | {r['latents_rows_per_s']} | "
            f"{r['driver_rss_mb']} | {r['driver_rss_after_ray_mb']} | {r['driver_rss_after_ingest_mb']} | "
            f"{r['ingest_anon_peak_mb']} / {r['latents_anon_peak_mb']} | "
            f"{r['ingest_shmem_peak_mb']} / {r['latents_shmem_peak_mb']} |"
        )
    if args.json:
        print(
            json.dumps(
                {
                    "source": args.source,
                    "image_size": args.image_size,
                    "channels": args.channels,
                    "sizes": results,
                    "driver_rss_mb": {str(r["n"]): r["driver_rss_mb"] for r in results},
                }
            )
        )


if __name__ == "__main__":
    main()
