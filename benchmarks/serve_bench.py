"""Serving throughput and latency: batched vs unbatched Serve, and Serve vs the model in-process.

    python benchmarks/serve_bench.py [--store URI --model REF] [--requests 400] [--images 1]

Without ``--store`` it commits a synthetic, untrained generator of the default pipeline's
size (DiT-T/2 on 4x4x4 latents, a 32-channel VAE decoding 16x16 grayscale, consistency
sampling) to a temporary store: timings depend on the architecture, not on the weights.

One run, same machine, same model, same request mix (``--images`` per request, served
steps), side by side:

    in-process   Generator.generate_many on the driver, c requests merged into one call
                 (what perfect batching could reach) and c = 1 (one request per call)
    batched      the Serve app over HTTP, max_batch_size from the config
    unbatched    the same app with max_batch_size = 1

at concurrency 1, 8 and 32 (asyncio clients, each sending its next request when the last
one returns). The replica gets ``--cpus`` CPUs and the in-process baseline the same number
of torch threads. Overhead = Serve p50 at concurrency 1 minus in-process p50 of one request.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from infra.config import ServeConfig  # noqa: E402
from infra.store import Store  # noqa: E402
from models.dit import DiT, dit_config  # noqa: E402
from models.registry import model_spec  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402
from infra.cards import GeneratorCard, VAECard  # noqa: E402
from infra.config import Resources  # noqa: E402
from workers.generator import Generator, Request  # noqa: E402

CONCURRENCY = (1, 8, 32)


@dataclass(frozen=True)
class Result:
    mode: str
    concurrency: int
    requests: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    mean_batch: float  # requests per forward pass, as the server reports it (1 in-process c=1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def synthetic_store(root: str) -> tuple[Store, str]:
    store = Store.open(root)
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, latent_channels=4, base_channels=32, downsample=4))
    with store.begin("vae", "bench", config={"bench": True}) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        card = VAECard(latent_scale=1.0, latent_shape=(4, 4, 4), in_channels=1, image_size=16, latent_channels=4,
                       downsample=4, recon_mse_train=0.0, measured_on=0)
        vae_manifest = writer.commit(metrics=card.to_metrics())
    net = DiT(dit_config("DiT-T/2", input_size=4, in_channels=4, num_classes=10, class_dropout_prob=0.0))
    with store.begin("consistency", "bench", config={"bench": True}, inputs=[vae_manifest]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(family="consistency", steps=0, latent_shape=(4, 4, 4), num_classes=10, latent_scale=1.0,
                             vae_ref=vae_manifest.ref)
        manifest = writer.commit(metrics=card.to_metrics())
    return store, manifest.ref


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not 8000 <= port <= 9000:
            return port


def body(i: int, images: int, steps: int, num_classes: int) -> dict:
    return {"n": images, "steps": steps, "seed": i, "labels": [(i + j) % num_classes for j in range(images)]}


def served_sampler(generator: Generator) -> str:
    return next(iter(generator.samplers))  # the family's default, as the Serve app picks it for one-step models


def in_process(generator: Generator, concurrency: int, requests: int, images: int, steps: int) -> Result:
    """c requests per generate_many call: the forward-pass cost without HTTP, Serve or waiting."""
    calls = max(1, requests // concurrency)
    batch = []
    for i in range(concurrency):
        fields = body(i, images, steps, generator.num_classes)
        batch.append(Request(n=fields["n"], steps=steps, sampler=served_sampler(generator),
                             labels=tuple(fields["labels"]), seed=fields["seed"]))
    generator.generate_many(batch)  # warm up
    latencies = []
    started = time.perf_counter()
    for _ in range(calls):
        t = time.perf_counter()
        generator.generate_many(batch)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    return Result("in-process", concurrency, calls * concurrency, calls * concurrency * images / wall,
                  1000 * statistics.median(latencies), 1000 * percentile(latencies, 99), float(concurrency))


async def over_http(url: str, mode: str, concurrency: int, requests: int, images: int, steps: int,
                    num_classes: int) -> Result:
    latencies: list[float] = []
    batches: list[int] = []
    failures: list[str] = []
    counter = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for i in range(concurrency):  # warm up every connection
            await client.post("/v1/generate", json=body(i, images, steps, num_classes))

        async def worker() -> None:
            for i in counter:
                t = time.perf_counter()
                response = await client.post("/v1/generate", json=body(i, images, steps, num_classes))
                latencies.append(time.perf_counter() - t)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                else:
                    batches.append(response.json()["batch_requests"])

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"{len(failures)} of {requests} requests failed, e.g. {failures[0]}")
    return Result(mode, concurrency, requests, requests * images / wall, 1000 * statistics.median(latencies),
                  1000 * percentile(latencies, 99), statistics.mean(batches))


def table(results: list[Result]) -> str:
    lines = ["| mode | concurrency | requests | images/s | p50 ms | p99 ms | requests per forward pass |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | "
                     f"{r.p99_ms:.1f} | {r.mean_batch:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a store with a generator (default: a synthetic one in a temp folder)")
    parser.add_argument("--model", help="the ref to serve (default: the synthetic model, or serving/current)")
    parser.add_argument("--requests", type=int, default=400, help="requests per (mode, concurrency)")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per request")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the replica = torch threads in-process")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.store:
        store = Store.open(args.store)
        ref = args.model or store.get_pointer("serving/current")
    else:
        store, ref = synthetic_store(tempfile.mkdtemp(prefix="fewstep-bench-"))
    torch.set_num_threads(max(1, int(args.cpus)))
    generator = Generator.load(store, store.get_ref(ref), device="cpu")
    print(f"model {ref} ({generator.card.family}), {args.images} image(s) per request, {args.steps} step(s), "
          f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}", flush=True)

    results = [in_process(generator, c, args.requests, args.images, args.steps) for c in CONCURRENCY]

    from ray import serve

    from workers.runtime import ensure_ray
    from workers.serving import app as serve_app

    ensure_ray()
    config = ServeConfig(max_batch_size=args.max_batch_size, batch_wait_timeout_s=args.batch_wait_ms / 1000,
                         max_ongoing_requests=max(64, args.max_batch_size), max_n=max(64, args.images),
                         steps=args.steps, resources=Resources(cpus=args.cpus), max_queued_requests=1024)
    port = free_port()
    try:
        for mode, batch in (("Serve batched", args.max_batch_size), ("Serve unbatched", 1)):
            url = serve_app.start(store.uri, config, ref, host="127.0.0.1", port=port, max_batch_size=batch)
            for c in CONCURRENCY:
                results.append(asyncio.run(over_http(url, mode, c, args.requests, args.images, args.steps,
                                                     generator.num_classes)))
                print(table(results[-1:]).splitlines()[-1], flush=True)
            serve.delete(serve_app.APP_NAME)
    finally:
        serve_app.stop()

    print()
    print(table(results))
    by = {(r.mode, r.concurrency): r for r in results}
    print()
    for c in CONCURRENCY:
        b, u = by[("Serve batched", c)], by[("Serve unbatched", c)]
        print(f"concurrency {c:>2}: batched/unbatched throughput x{b.images_per_s / u.images_per_s:.2f}, "
              f"p99 {b.p99_ms:.0f} vs {u.p99_ms:.0f} ms")
    overhead = by[("Serve unbatched", 1)].p50_ms - by[("in-process", 1)].p50_ms
    print(f"HTTP + Serve overhead at concurrency 1 (unbatched p50 - in-process p50): {overhead:.1f} ms per request")


if __name__ == "__main__":
    main()
