"""Serving throughput and latency: batched vs unbatched Serve, and Serve vs the model in-process.

    python benchmarks/serve_bench.py [--store URI --model REF] [--seconds 5] [--images 1] [--steps 2]
                                     [--client auto|wrk|python] [--json]

Without ``--store`` it commits a synthetic, untrained generator of the default pipeline's
size (DiT-T/2 on 4x4x4 latents, a 32-channel VAE decoding 16x16 grayscale, consistency
sampling) to a temporary store: timings depend on the architecture, not on the weights.

One run, same machine, same model, same request mix (``--images`` per request, ``--steps``),
side by side:

    in-process   Generator.generate_many in this process, c requests merged into one call
                 (what perfect batching could reach), one torch thread per replica CPU
    batched      the Serve app over HTTP (max_batch_size, batch_wait_timeout_s from the flags)
    unbatched    the same app with max_batch_size = 1

at concurrency 1, 8 and 32 (closed loop: each connection sends its next request when the
last one returns), for two answers: ``raw`` (Accept: application/octet-stream, the pixels as
bytes) and ``json`` (base64 PNGs). The load comes from a separate process pinned to the last
core: ``wrk`` (C, Debian's package) when it is on PATH, else an asyncio+httpx client; its CPU
time is reported per request. Requests per forward pass = requests / batches, where a
request's batch holds ``batch_requests`` requests (so batches = sum of 1 / batch_requests).

``--json`` prints one JSON object last: every row, and
    overhead_ms_c1               Serve unbatched p50 - in-process p50 at concurrency 1 (raw answers)
    batched_minus_unbatched_ms_c1  batched p50 - unbatched p50 at concurrency 1 (raw)
    batched_over_unbatched_c32   throughput ratio at concurrency 32 (raw)
    serve_over_inprocess_c32     Serve batched / in-process merged throughput at concurrency 32 (raw)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONCURRENCY = (1, 8, 32)
ACCEPT = {"raw": "application/octet-stream", "json": "application/json"}


@dataclass(frozen=True)
class Result:
    mode: str
    answer: str  # raw | json | - (in-process)
    concurrency: int
    requests: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    per_pass: float  # requests per forward pass
    client_cpu_ms: float  # load generator CPU per request (0 in-process)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def body(i: int, images: int, steps: int, num_classes: int) -> dict:
    return {"n": images, "steps": steps, "seed": i, "labels": [(i + j) % num_classes for j in range(images)]}


# --------------------------------------------------------------------------- the model


def synthetic_store(root: str):
    import torch

    from infra.cards import GeneratorCard, VAECard
    from infra.store import Store
    from models.dit import DiT, dit_config
    from models.registry import model_spec
    from models.vae import VAE, VAEConfig

    store = Store.open(root)
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, latent_channels=4, base_channels=32, downsample=4))
    with store.begin("vae", "bench", config={"bench": True}) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        card = VAECard(
            latent_scale=1.0,
            latent_shape=(4, 4, 4),
            in_channels=1,
            image_size=16,
            latent_channels=4,
            downsample=4,
            recon_mse_train=0.0,
            measured_on=0,
        )
        vae_manifest = writer.commit(metrics=card.to_metrics())
    net = DiT(dit_config("DiT-T/2", input_size=4, in_channels=4, num_classes=10))
    with store.begin("consistency", "bench", config={"bench": True}, inputs=[vae_manifest]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family="consistency",
            steps=0,
            latent_shape=(4, 4, 4),
            num_classes=10,
            latent_scale=1.0,
            vae_ref=vae_manifest.ref,
        )
        manifest = writer.commit(metrics=card.to_metrics())
    return store, manifest.ref


def in_process(generator, concurrency: int, seconds: float, images: int, steps: int) -> Result:
    """c requests per generate_many call: the forward-pass cost without HTTP, Serve or waiting."""
    from workers.generator import Request

    sampler = next(iter(generator.samplers))  # the family's default, as the app serves one-step models
    batch = [
        Request(
            n=images,
            steps=steps,
            sampler=sampler,
            seed=i,
            labels=tuple(body(i, images, steps, generator.num_classes)["labels"]),
        )
        for i in range(concurrency)
    ]
    generator.generate_many(batch)  # warm up
    latencies, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(latencies) < 3:
        t = time.perf_counter()
        generator.generate_many(batch)
        latencies.append(time.perf_counter() - t)
    wall = time.perf_counter() - started
    done = len(latencies) * concurrency
    return Result(
        "in-process",
        "-",
        concurrency,
        done,
        done * images / wall,
        1000 * statistics.median(latencies),
        1000 * percentile(latencies, 99),
        float(concurrency),
        0.0,
    )


# --------------------------------------------------------------------------- load generators


WRK_SCRIPT = """
local threads = {}
local counter = 0
function setup(thread) table.insert(threads, thread) end
function init(args)
  images, steps, classes, accept = tonumber(args[1]), tonumber(args[2]), tonumber(args[3]), args[4]
  failures, inverse = 0, 0.0
end
function request()
  counter = counter + 1
  local seed = counter
  local labels = {}
  for j = 0, images - 1 do labels[#labels + 1] = tostring((seed + j) % classes) end
  local payload = string.format('{"n":%d,"steps":%d,"seed":%d,"labels":[%s]}', images, steps, seed, table.concat(labels, ","))
  return wrk.format("POST", "/v1/generate", {["Content-Type"] = "application/json", ["Accept"] = accept}, payload)
end
function response(status, headers, body)
  if status ~= 200 then failures = failures + 1 return end
  local b = headers["x-batch-requests"] or headers["X-Batch-Requests"] or string.match(body, '"batch_requests":(%d+)')
  if b then inverse = inverse + 1.0 / tonumber(b) end
end
function done(summary, latency, requests)
  local f, inv = 0, 0.0
  for _, t in ipairs(threads) do f = f + t:get("failures"); inv = inv + t:get("inverse") end
  io.write(string.format('WRK {"requests": %d, "seconds": %f, "p50_us": %f, "p99_us": %f, "failures": %d, "inverse": %f, "errors": %d}\\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50), latency:percentile(99), f, inv,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout))
end
"""


def pinned_core() -> list[str]:
    """``taskset -c <last core>`` when taskset exists and there is more than one core."""
    cores = sorted(os.sched_getaffinity(0))
    return ["taskset", "-c", str(cores[-1])] if len(cores) > 1 and shutil.which("taskset") else []


def run_client(command: list[str]) -> tuple[str, float]:
    """Run a load generator; (its stdout, its CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(pinned_core() + command, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode != 0:
        raise RuntimeError(f"load generator {command[0]} failed ({out.returncode}): {out.stderr[-2000:]}")
    return out.stdout, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def over_wrk(
    url: str,
    mode: str,
    answer: str,
    concurrency: int,
    seconds: float,
    images: int,
    steps: int,
    num_classes: int,
    script: str,
) -> Result:
    args = [str(images), str(steps), str(num_classes), ACCEPT[answer]]
    run_client(["wrk", "-t1", f"-c{concurrency}", "-d1s", "-s", script, url, "--", *args])  # warm up
    out, cpu = run_client(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency", "-s", script, url, "--", *args]
    )
    line = next(text for text in out.splitlines() if text.startswith("WRK "))
    got = json.loads(line[4:])
    if got["failures"] or got["errors"]:
        raise RuntimeError(
            f"{got['failures']} non-200 answers and {got['errors']} socket errors in {got['requests']} requests"
        )
    n = got["requests"]
    per_pass = n / got["inverse"] if got["inverse"] else float("nan")
    return Result(
        mode,
        answer,
        concurrency,
        n,
        n * images / got["seconds"],
        got["p50_us"] / 1000,
        got["p99_us"] / 1000,
        per_pass,
        1000 * cpu / max(1, n),
    )


async def python_client(
    url: str, accept: str, concurrency: int, seconds: float, images: int, steps: int, num_classes: int
) -> dict:
    """The asyncio+httpx load generator (``--client-worker``); runs in its own process."""
    import httpx

    latencies, inverse, failures = [], 0.0, []
    counter = iter(range(10**9))
    headers = {"accept": accept}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        for i in range(concurrency):
            await client.post("/v1/generate", json=body(i, images, steps, num_classes), headers=headers)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal inverse
            while time.perf_counter() < deadline:
                i = next(counter)
                t = time.perf_counter()
                response = await client.post("/v1/generate", json=body(i, images, steps, num_classes), headers=headers)
                latencies.append(time.perf_counter() - t)
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    continue
                batch = response.headers.get("x-batch-requests") or response.json()["batch_requests"]
                inverse += 1.0 / int(batch)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "seconds": wall,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * percentile(latencies, 99),
        "inverse": inverse,
        "failures": failures[:3],
    }


def over_python(
    url: str, mode: str, answer: str, concurrency: int, seconds: float, images: int, steps: int, num_classes: int
) -> Result:
    out, cpu = run_client(
        [
            sys.executable,
            __file__,
            "--client-worker",
            url,
            ACCEPT[answer],
            str(concurrency),
            str(seconds),
            str(images),
            str(steps),
            str(num_classes),
        ]
    )
    got = json.loads(next(line for line in reversed(out.splitlines()) if line.startswith("{")))
    if got["failures"]:
        raise RuntimeError(f"requests failed, e.g. {got['failures'][0]}")
    n = got["requests"]
    return Result(
        mode,
        answer,
        concurrency,
        n,
        n * images / got["seconds"],
        got["p50_ms"],
        got["p99_ms"],
        n / got["inverse"] if got["inverse"] else float("nan"),
        1000 * cpu / max(1, n),
    )


# --------------------------------------------------------------------------- report


def table(results: list[Result]) -> str:
    lines = [
        "| mode | answer | concurrency | requests | images/s | p50 ms | p99 ms | requests per forward pass | client CPU ms/request |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.mode} | {r.answer} | {r.concurrency} | {r.requests} | {r.images_per_s:.1f} | {r.p50_ms:.1f} | "
            f"{r.p99_ms:.1f} | {r.per_pass:.1f} | {r.client_cpu_ms:.2f} |"
        )
    return "\n".join(lines)


def free_port() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not 8000 <= port <= 9000:
            return port


def summary(results: list[Result]) -> dict:
    by = {(r.mode, r.answer, r.concurrency): r for r in results}

    def pick(mode: str, answer: str, c: int) -> Result | None:
        return by.get((mode, answer, c))

    out = {}
    for answer in ("raw", "json"):
        suffix = "" if answer == "raw" else "_json"
        b1, u1, i1 = pick("Serve batched", answer, 1), pick("Serve unbatched", answer, 1), pick("in-process", "-", 1)
        b32, u32, i32 = (
            pick("Serve batched", answer, 32),
            pick("Serve unbatched", answer, 32),
            pick("in-process", "-", 32),
        )
        if u1 and i1:
            out[f"overhead_ms_c1{suffix}"] = round(u1.p50_ms - i1.p50_ms, 3)
        if b1 and u1:
            out[f"batched_minus_unbatched_ms_c1{suffix}"] = round(b1.p50_ms - u1.p50_ms, 3)
        if b32 and u32:
            out[f"batched_over_unbatched_c32{suffix}"] = round(b32.images_per_s / u32.images_per_s, 3)
        if b32 and i32:
            out[f"serve_over_inprocess_c32{suffix}"] = round(b32.images_per_s / i32.images_per_s, 3)
        if b32:
            out[f"requests_per_pass_c32{suffix}"] = round(b32.per_pass, 2)
    return out


def bench_config(max_batch_size: int, batch_wait_ms: float, images: int, steps: int, cpus: float, gpus: float):
    """The deployment's ServeConfig for a load of ``images`` x ``steps`` requests."""
    from infra.config import Resources, ServeConfig

    cap = {"max_batch_images_steps": max(4096, images * steps * max_batch_size)}
    if "max_batch_images_steps" not in ServeConfig.model_fields:  # code from before the field (for "before" runs)
        cap = {}
    return ServeConfig(
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000,
        max_ongoing_requests=max(64, max_batch_size),
        max_n=max(64, images),
        steps=steps,
        resources=Resources(cpus=cpus, gpus=gpus),
        max_queued_requests=1024,
        **cap,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="a store with a generator (default: a synthetic one in a temp folder)")
    parser.add_argument("--model", help="the ref to serve (default: the synthetic model, or serving/current)")
    parser.add_argument("--seconds", type=float, default=5.0, help="load per (mode, answer, concurrency)")
    parser.add_argument("--images", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps per request")
    parser.add_argument("--cpus", type=float, default=1.0, help="CPUs of the replica = torch threads in-process")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--answers", default="raw,json", help="which answers to load: raw, json")
    parser.add_argument("--client", choices=("auto", "wrk", "python"), default="auto")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--client-worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client_worker:  # the separate load-generator process
        url, accept, c, seconds, images, steps, classes = args.client_worker
        print(
            json.dumps(
                asyncio.run(python_client(url, accept, int(c), float(seconds), int(images), int(steps), int(classes)))
            )
        )
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import torch

    from infra.store import Store
    from workers.generator import Generator

    if args.store:
        store = Store.open(args.store)
        ref = args.model or store.get_pointer("serving/current")
    else:
        store, ref = synthetic_store(tempfile.mkdtemp(prefix="fewstep-bench-"))
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and shutil.which("wrk")) else "python"
    torch.set_num_threads(max(1, int(args.cpus)))
    generator = Generator.load(store, store.get_ref(ref), device=args.device)
    answers = [a for a in args.answers.split(",") if a]
    print(
        f"model {ref} ({generator.card.family}) on {generator.device}, {args.images} image(s) per request, "
        f"{args.steps} step(s), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
        f"load from {client} pinned to {pinned_core()[2:] or 'any core'}",
        flush=True,
    )

    results = [in_process(generator, c, args.seconds, args.images, args.steps) for c in CONCURRENCY]
    for r in results:
        print(table([r]).splitlines()[-1], flush=True)

    from ray import serve

    from workers.runtime import ensure_ray
    from workers.serving import app as serve_app

    ensure_ray()
    gpus = 1.0 if generator.device.type == "cuda" else 0.0
    config = bench_config(args.max_batch_size, args.batch_wait_ms, args.images, args.steps, args.cpus, gpus)
    port = free_port()
    script = None
    if client == "wrk":
        handle, script = tempfile.mkstemp(suffix=".lua")
        os.write(handle, WRK_SCRIPT.encode())
        os.close(handle)
    try:
        for mode, batch in (("Serve batched", args.max_batch_size), ("Serve unbatched", 1)):
            url = serve_app.start(store.uri, config, ref, host="127.0.0.1", port=port, max_batch_size=batch)
            for answer in answers:
                for c in CONCURRENCY:
                    if client == "wrk":
                        result = over_wrk(
                            url, mode, answer, c, args.seconds, args.images, args.steps, generator.num_classes, script
                        )
                    else:
                        result = over_python(
                            url, mode, answer, c, args.seconds, args.images, args.steps, generator.num_classes
                        )
                    results.append(result)
                    print(table([result]).splitlines()[-1], flush=True)
            serve.delete(serve_app.APP_NAME)
    finally:
        serve_app.stop()
        if script:
            os.unlink(script)

    print()
    print(table(results))
    figures = summary(results)
    print()
    for name, value in figures.items():
        print(f"{name:36s} {value}")
    if args.json:
        print(
            json.dumps(
                {
                    "client": client,
                    "images": args.images,
                    "steps": args.steps,
                    "cpus": args.cpus,
                    "device": str(generator.device),
                    "rows": [asdict(r) for r in results],
                    **figures,
                }
            )
        )


if __name__ == "__main__":
    main()
