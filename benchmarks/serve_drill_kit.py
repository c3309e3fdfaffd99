"""What the Serve drills share: a tiny store, the app, a load client in its own process, figures.

    tiny_store(root)                a store with a VAE, two good generators, and broken ones
    serving(store_uri, config)      the real Serve app (workers.serving.app.start) on 127.0.0.1
    Load(url, ...)                  benchmarks/serve_load_client.py in a subprocess, its records
    load_figures(records)           counts per status, latency percentiles, throughput
    kill_replica() / replicas()     a Serve replica killed with ray.kill, the running count

The drills (benchmarks/drill_serve_*.py) and their fast variants in
tests/workers/test_serve_drills.py both use these. Everything is loopback and bounded: a
client stops after ``requests`` requests or when its stop file appears, whichever is first.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from infra.cards import GeneratorCard, VAECard  # noqa: E402
from infra.config import Resources, ServeConfig  # noqa: E402
from infra.store import Manifest, Store  # noqa: E402
from models.dit import DiT, dit_config  # noqa: E402
from models.registry import model_spec  # noqa: E402
from models.vae import VAE, VAEConfig  # noqa: E402

CLIENT = Path(__file__).resolve().parent / "serve_load_client.py"
APP_NAME = "fewstep"
DEPLOYMENT = "FewstepGenerator"
NUM_CLASSES = 3
LATENT = (2, 4, 4)  # (C, H, W): a 4x downsampling VAE decodes it to 16x16 grayscale
POINTER = "serving/current"


# --------------------------------------------------------------------------- a tiny store


def commit_vae(store: Store) -> Manifest:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(in_channels=1, latent_channels=LATENT[0], base_channels=4, downsample=4))
    with store.begin("vae", "drill", config={"drill": True}) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        card = VAECard(
            latent_scale=1.0,
            latent_shape=LATENT,
            in_channels=1,
            image_size=16,
            latent_channels=LATENT[0],
            downsample=4,
            recon_mse_train=0.0,
            measured_on=0,
        )
        return writer.commit(metrics=card.to_metrics())


def commit_generator(
    store: Store, stage: str, family: str, seed: int, vae: Manifest, poison: str | None = None
) -> Manifest:
    """An untrained DiT, nudged so that it depends on x, t and y; ``poison`` breaks it on purpose:

    "nan"       NaN weights in the output layer (what a diverged run commits)
    "inf"       an infinite weight
    "overflow"  finite weights (1e38) whose output overflows to inf: only the sanity batch sees it
    """
    torch.manual_seed(seed)
    net = DiT(dit_config("DiT-T/2", input_size=LATENT[1], in_channels=LATENT[0], num_classes=NUM_CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        weight = net.final_layer.linear.weight
        if poison == "nan":
            weight.fill_(float("nan"))
        elif poison == "inf":
            weight[0, 0] = float("inf")
        elif poison == "overflow":
            weight.fill_(1e38)
        elif poison is not None:
            raise ValueError(f"poison is 'nan', 'inf' or 'overflow', not {poison!r}")
    key = f"drill{seed}" + (f"-{poison}" if poison else "")
    with store.begin(stage, key, config={"seed": seed, "poison": poison}, inputs=[vae]) as writer:
        writer.write_model("model", net, model_spec(net))
        card = GeneratorCard(
            family=family, steps=0, latent_shape=LATENT, num_classes=NUM_CLASSES, latent_scale=1.0, vae_ref=vae.ref
        )
        return writer.commit(metrics=card.to_metrics())


def flip_byte(store: Store, manifest: Manifest, name: str = "model") -> str:
    """Flip one byte in the middle of a committed local file; its sha256 no longer matches."""
    path = store.file_path(manifest, name)
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    return path


@dataclass(frozen=True)
class TinyStore:
    store: Store
    first: Manifest  # consistency, served first
    second: Manifest  # flow (euler), a good model to swap to
    nan: Manifest  # NaN weights
    overflow: Manifest  # finite weights, non-finite output
    corrupt: Manifest  # a good model whose weights file has one byte flipped


def tiny_store(root: str | Path) -> TinyStore:
    store = Store.open(str(root))
    vae = commit_vae(store)
    first = commit_generator(store, "consistency", "consistency", 1, vae)
    second = commit_generator(store, "base", "flow", 2, vae)
    nan = commit_generator(store, "base", "flow", 3, vae, poison="nan")
    overflow = commit_generator(store, "base", "flow", 4, vae, poison="overflow")
    corrupt = commit_generator(store, "base", "flow", 5, vae)
    flip_byte(store, corrupt)
    store.put_pointer(POINTER, first.ref)
    return TinyStore(store, first, second, nan, overflow, corrupt)


def drill_config(replicas: int = 1, poll_s: float = 0.2) -> ServeConfig:
    """Small limits so that a valid request costs milliseconds: n <= 4, 2 served steps."""
    return ServeConfig(
        steps=2,
        max_n=4,
        max_steps=8,
        max_guidance=5.0,
        max_batch_size=16,
        batch_wait_timeout_s=0.005,
        max_ongoing_requests=64,
        max_queued_requests=512,
        max_body_bytes=4096,
        poll_s=poll_s,
        resources=Resources(workers=replicas, cpus=1),
    )


# --------------------------------------------------------------------------- the app


def free_port() -> int:
    """A free port outside 8000-9000 (Prefect's test harness uses those)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not 8000 <= port <= 9000:
            return port


def start_ray() -> None:
    """Attach to the cluster RAY_ADDRESS names, else start a local Ray with 4 logical CPUs (as the tests do).

    ``local`` is explicit: a bare ``ray.init()`` would attach to any cluster ``ray start`` left on the machine."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS") or "local"
    if address == "local":
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    else:
        ray.init(address=address, log_to_driver=False)


@contextmanager
def serving(store_uri: str, config: ServeConfig, model: str | None = None) -> Iterator[str]:
    """The real app (the code ``fewstep serve`` runs) on a free loopback port; Ray must be up."""
    from workers.serving import app as serve_app

    url = serve_app.start(store_uri, config, model, host="127.0.0.1", port=free_port())
    try:
        yield url
    finally:
        serve_app.stop()


def health(url: str) -> dict[str, Any]:
    response = httpx.get(url + "healthz", timeout=30)
    response.raise_for_status()
    return response.json()


def wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll ``condition()`` until it returns something truthy; that value, or AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(poll_s)


def replicas(state: str = "RUNNING") -> int:
    """How many replicas of the app's deployment are in ``state``, as Serve reports it."""
    from ray import serve

    app = serve.status().applications.get(APP_NAME)
    if app is None or DEPLOYMENT not in app.deployments:
        return 0
    return int(app.deployments[DEPLOYMENT].replica_states.get(state, 0))


def replica_names() -> list[str]:
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#{DEPLOYMENT}#"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))


def kill_replica() -> str:
    """Kill one replica actor (``ray.kill``, no restart: Serve's controller starts a new one)."""
    import ray

    name = replica_names()[0]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    return name


# --------------------------------------------------------------------------- load from another process


@dataclass
class Load:
    """``serve_load_client.py`` running in its own process against ``url``; records land in ``out``."""

    url: str
    out: Path
    requests: int
    concurrency: int = 32
    invalid: float = 0.3
    seed: int = 0
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def stop_file(self) -> Path:
        return self.out.with_suffix(".stop")

    def start(self) -> Load:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        for path in (self.out, self.stop_file):
            path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(CLIENT),
                self.url,
                "--requests",
                str(self.requests),
                "--concurrency",
                str(self.concurrency),
                "--invalid",
                str(self.invalid),
                "--seed",
                str(self.seed),
                "--out",
                str(self.out),
                "--stop-file",
                str(self.stop_file),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        return self

    def done(self) -> int:
        """Requests answered so far."""
        if not self.out.exists():
            return 0
        with open(self.out, "rb") as f:
            return sum(1 for _ in f)

    def stop(self) -> None:
        self.stop_file.touch()

    def wait(self, timeout_s: float = 300) -> list[dict[str, Any]]:
        try:
            output, _ = self.process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.send_signal(signal.SIGKILL)
            output, _ = self.process.communicate()
            raise AssertionError(f"the load client ran over {timeout_s}s:\n{output[-2000:]}") from None
        if self.process.returncode != 0:
            raise AssertionError(f"the load client failed ({self.process.returncode}):\n{output[-2000:]}")
        return self.records()

    def records(self) -> list[dict[str, Any]]:
        with open(self.out) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


@dataclass(frozen=True)
class LoadFigures:
    requests: int
    valid: int
    invalid: int
    seconds: float
    requests_per_s: float
    valid_status: dict[str, int]  # status (0 = no answer) -> count, valid bodies
    invalid_status: dict[str, int]  # the same for invalid bodies
    valid_5xx: int
    valid_failed: int  # valid bodies that did not get a 200 (5xx, 4xx or no answer)
    invalid_5xx: int
    p50_ms: float  # latency of valid requests answered 200
    p95_ms: float
    p99_ms: float
    models: dict[str, int]  # which model drew the 200s

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_figures(records: list[dict[str, Any]]) -> LoadFigures:
    valid = [r for r in records if r["valid"]]
    invalid = [r for r in records if not r["valid"]]
    ok = [r for r in valid if r["status"] == 200]
    latencies = [1000 * (r["end"] - r["start"]) for r in ok] or [float("nan")]
    seconds = max(r["end"] for r in records) - min(r["start"] for r in records) if records else 0.0

    def count(rows):
        return {str(k): v for k, v in sorted(Counter(r["status"] for r in rows).items())}

    return LoadFigures(
        requests=len(records),
        valid=len(valid),
        invalid=len(invalid),
        seconds=round(seconds, 2),
        requests_per_s=round(len(records) / seconds, 1) if seconds else 0.0,
        valid_status=count(valid),
        invalid_status=count(invalid),
        valid_5xx=sum(r["status"] >= 500 for r in valid),
        valid_failed=len(valid) - len(ok),
        invalid_5xx=sum(r["status"] >= 500 for r in invalid),
        p50_ms=round(percentile(latencies, 50), 1),
        p95_ms=round(percentile(latencies, 95), 1),
        p99_ms=round(percentile(latencies, 99), 1),
        models=dict(Counter(r["model"] for r in ok)),
    )


def print_json_last(figures: dict[str, Any]) -> None:
    """The ``--json`` contract: one JSON object, on the last line."""
    print(json.dumps(figures, sort_keys=True), flush=True)
