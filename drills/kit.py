"""What the drills share, and their fast variants in tests/ with them.

    CONFIGS (tiny, micro)           the pipeline configs the fault drills run
    ensure_ray_cluster()            the Ray cluster every drill attaches to
    PrefectServer(home)             ``prefect server start`` on a free port (the tests' ``prefect_server`` too)
    MotoServer / TcpRelay           an S3 endpoint that can hang, and a relay that can refuse
    WatchedRun                      ``fewstep run`` in its own process group, its stage lines as events
    audit_store(store)              every manifest read and verified after the faults
    tiny_store(root)                a servable store without training: a VAE, good and broken generators
    serving(store_uri, config)      the real Serve app (workers.serving.app.start) on 127.0.0.1
    Load(url, ...)                  drills/serve_load_client.py in a subprocess, its records
    load_figures(records)           counts per status, latency percentiles, throughput

Everything is real and loopback: a ``prefect server`` process, moto's S3 server, the CLI as a
user runs it, the Serve app over HTTP. Run a drill from the repository root as a module, e.g.
``python -m drills.kill_drill``; RELIABILITY.md records what they measured.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from infra.cards import GeneratorCard, VAECard
from infra.config import Resources, ServeConfig
from infra.store import SERVING_POINTER, Manifest, Store
from models.dit import DiT, dit_config
from models.registry import model_spec
from models.vae import VAE, VAEConfig
from workers.stages import STAGE_MODULES

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).resolve().parent / "serve_load_client.py"
APP_NAME = "fewstep"
DEPLOYMENT = "FewstepGenerator"
NUM_CLASSES = 3
LATENT = (2, 4, 4)  # (C, H, W): a 4x downsampling VAE decodes it to 16x16 grayscale
IMAGE_SHAPE = [16, 16, 1]

OPTIONAL_STAGES = ("ddpm",)  # off unless the config turns it on
# The pipeline's stages in the order a run reaches them, and "promote" (after evaluate commits).
STAGES = tuple(stage for stage in STAGE_MODULES if stage not in OPTIONAL_STAGES)
KILLABLE = (*STAGES, "promote")
# The feature-space section of the config (named after its stage).
FEATURES = "features"

# The quick preset, smaller still: every stage runs, each for a few steps (the tests' tiny pipeline too).
TINY: dict[str, Any] = {
    "ingest": {"limit": 240},
    "vae": {"steps": 30, "base_channels": 8, "batch_size": 32},
    "base": {"steps": 40, "batch_size": 32, "checkpoint_every": 10},
    "pairs": {"pairs": 64, "steps": 2, "batch_size": 64},
    "reflow": {"steps": 10, "batch_size": 32, "checkpoint_every": 5},
    "consistency": {"intervals": 4, "steps": 10, "batch_size": 32, "checkpoint_every": 5},
    # Off: the tests that check one pipeline's stages and its promoted student keep to consistency;
    # tests/flows/test_pipeline.py switches it on for the harness run.
    "flowmap": {"enabled": False, "steps": 8, "batch_size": 32, "checkpoint_every": 4},
    # Off as flowmap is; the harness run switches them on.
    "guidance_distill": {"enabled": False, "steps": 8, "batch_size": 32, "checkpoint_every": 4},
    "lora": {"enabled": False, "rank": 4, "intervals": 4, "steps": 8, "batch_size": 32, "checkpoint_every": 4},
    FEATURES: {"steps": 30, "batch_size": 32},
    "evaluate": {
        "n": 32,
        "flow_steps": [1, 2],
        "flow_solvers": ["euler"],
        "consistency_steps": [1],
        "guidance": [1, 2],
    },
    "probe": {"n": 32, "steps": 2, "student_steps": 1, "fid_resamples": 10},
    # A few training steps learn nothing: the absolute bar is off so the flow's promotion runs.
    "serve": {"min_accuracy_over_chance": 0.0, "max_excess_over_ceiling": None},
}
# Smaller again, for the tests' fast variants: Ray Train's start-up dominates either way.
MICRO: dict[str, Any] = {
    **TINY,
    "ingest": {"limit": 120},
    "vae": {"steps": 12, "base_channels": 8, "batch_size": 32, "checkpoint_every": 4},
    "base": {"steps": 12, "batch_size": 32, "checkpoint_every": 4},
    "reflow": {"steps": 4, "batch_size": 32, "checkpoint_every": 2},
    "consistency": {"intervals": 4, "steps": 4, "batch_size": 32, "checkpoint_every": 2},
    FEATURES: {"steps": 10, "batch_size": 32},
    "evaluate": {"n": 16, "flow_steps": [1], "flow_solvers": ["euler"], "consistency_steps": [1]},
}
CONFIGS = {"tiny": TINY, "micro": MICRO}
_STARTED_RAY: list[str] = []  # the address of the Ray this process started, if it did


def free_port() -> int:
    """A free loopback port outside 8000-9000 and Ray's defaults (Prefect's ephemeral servers and Ray take those)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not 8000 <= port <= 9000 and port not in (10001, 52365, 6379, 8265):
            return port


def stop_group(process: subprocess.Popen, grace_s: float = 20) -> None:
    """SIGTERM the process group of a process started with ``start_new_session``; SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def log(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Ray and Prefect


def ensure_ray_cluster(connect: bool = False) -> str:
    """The Ray every run attaches to: ``RAY_ADDRESS`` if set (e.g. the tests' ``ray_local``), else a
    local one started in this process (stopped when it exits). Exported as RAY_ADDRESS.

    ``connect``: this process drives Ray itself (the Serve drills), not only the runs it starts.
    ``local`` is explicit: a bare ``ray.init()`` would attach to any cluster ``ray start`` left here."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = os.environ.get("RAY_ADDRESS")
    if address and address not in ("local", "auto"):
        if connect and not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        return address
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    os.environ["RAY_ADDRESS"] = address = ray.get_runtime_context().gcs_address
    _STARTED_RAY.append(address)
    return address


class PrefectServer:
    """``prefect server start`` on a free port with its own home and database; ``url`` is its API."""

    def __init__(self, home: Path, startup_timeout_s: float = 240.0):
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        env = dict(
            os.environ,
            PREFECT_HOME=str(home),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home}/prefect.db",
        )
        env.pop("PREFECT_API_URL", None)
        self.log_path = home / "server.log"
        with open(self.log_path, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + startup_timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"prefect server did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def api(self, path: str, body: dict[str, Any] | None = None, method: str = "POST") -> Any:
        """One call to the server's REST API (``path`` after ``/api``), its JSON answer."""
        data = json.dumps(body or {}).encode() if method == "POST" else None
        request = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def stop(self) -> None:
        stop_group(self.process, grace_s=30)


# --------------------------------------------------------------------------- an S3 endpoint that can fail


class MotoServer:
    """moto's S3 server in its own process group; without IAM (any keys are accepted) unless ``env``
    turns it on (the tests' ``s3_server`` does).

    :meth:`pause` / :meth:`resume` SIGSTOP / SIGCONT it: the endpoint still accepts TCP
    connections (the kernel does) but answers nothing, as a hung server does. Its state is in
    memory, so a real restart would empty it; a refused endpoint is :class:`TcpRelay`'s job.
    """

    KEY, SECRET, REGION = "drill-key", "drill-secret", "us-east-1"

    def __init__(self, log_path: Path, env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                env={**os.environ, **(env or {})},
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    break
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto did not start:\n{log_path.read_text()[-2000:]}")
            time.sleep(0.1)

    def client(self, endpoint: str | None = None):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint or self.url,
            region_name=self.REGION,
            aws_access_key_id=self.KEY,
            aws_secret_access_key=self.SECRET,
        )

    def env(self, endpoint: str) -> dict[str, str]:
        """The AWS variables that point fewstep (and every Ray worker it hands a store) at ``endpoint``."""
        return {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": self.KEY,
            "AWS_SECRET_ACCESS_KEY": self.SECRET,
            "AWS_DEFAULT_REGION": self.REGION,
            "AWS_REGION": self.REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def pause(self) -> None:
        os.killpg(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.resume()
        stop_group(self.process, grace_s=10)


class TcpRelay:
    """127.0.0.1:PORT -> an upstream TCP port, byte for byte, that can go down and come back.

    :meth:`down` closes the listening socket and resets every open connection: new requests get
    "connection refused", requests in flight a reset, as when an S3 endpoint (or its load
    balancer) goes away. :meth:`up` listens on the same port again.
    """

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.listener: socket.socket | None = None
        self.refused_since: float | None = None
        self.bytes = 0  # forwarded, both ways: how a drill sees S3 traffic
        self.up()

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for attempt in range(50):  # the old listener may take a moment to leave LISTEN
            try:
                listener.bind(("127.0.0.1", self.port))
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        listener.listen(256)
        self.listener, self.refused_since = listener, None
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def wait_for_traffic(self, timeout_s: float) -> bool:
        """Block until bytes flow through the relay (True), or ``timeout_s`` passes (False)."""
        seen, deadline = self.bytes, time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.bytes != seen:
                return True
            time.sleep(0.005)
        return False

    def down(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
            doomed, self.connections = self.connections, set()
        self.refused_since = time.monotonic()
        if listener is not None:
            try:  # wakes the thread blocked in accept(); close() alone would leave the port listening
                listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            listener.close()
        for conn in doomed:
            try:  # shutdown wakes the pump blocked in recv (close alone would not: the peer would wait forever)
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # then RST
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by down()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self.lock:
                if self.listener is not listener:
                    client.close()
                    upstream.close()
                    return
                self.connections.update((client, upstream))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
                self.bytes += len(data)
        except OSError:
            pass
        finally:
            for conn in (source, sink):
                with self.lock:
                    self.connections.discard(conn)
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                conn.close()


# --------------------------------------------------------------------------- fewstep run, watched


@dataclass
class Event:
    t: float  # seconds since the run started
    kind: str  # "start" (▸ running), "done" (✓), "reused" (=)
    stage: str


class WatchedRun:
    """``python -m flows.cli run ...`` in its own process group; its stage lines arrive as events.

    The progress view writes "▸ stage running", "✓ stage ...", "= stage reused ..." to stderr
    (one line each when stderr is not a terminal): that is what the drills steer by.
    """

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path):
        self.started = time.monotonic()
        self.log_path = log_path
        self.events: queue.Queue[Event] = queue.Queue()
        self.history: list[Event] = []
        self.tail: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", *args],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            bufsize=1,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log_path, "a") as sink:
            for line in self.process.stdout:
                sink.write(line)
                sink.flush()
                self.tail = (self.tail + [line.rstrip()])[-60:]
                parts = line.split()
                if len(parts) >= 2 and parts[0] in ("▸", "✓", "="):
                    kind = {"▸": "start", "✓": "done", "=": "reused"}[parts[0]]
                    if kind == "start" and parts[2:3] != ["running"]:
                        continue  # a progress update of a running stage
                    event = Event(round(time.monotonic() - self.started, 2), kind, parts[1])
                    self.history.append(event)
                    self.events.put(event)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def next_event(self, timeout: float) -> Event | None:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return None

    def kill(self) -> None:
        """SIGKILL the driver and everything in its process group (as a lost machine would)."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=60)
        self.reader.join(timeout=10)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return code


def run_env(prefect_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(
        os.environ,
        PREFECT_API_URL=prefect_url,
        PYTHONUNBUFFERED="1",
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    )
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- the audit


@dataclass
class Audit:
    """What a store holds after the faults: every manifest read and verified, nothing else trusted."""

    manifests: int = 0
    verified: int = 0
    torn: list[str] = field(default_factory=list)  # manifests that do not parse, or whose files do not verify
    per_stage: dict[str, int] = field(default_factory=dict)
    # Manifests per (stage, input refs): a stage may commit once per input (the probe after each
    # generator, pairs and reflow once per round), never twice on the same inputs in one drill.
    per_inputs: dict[str, int] = field(default_factory=dict)
    staging_attempts: int = 0  # attempt folders with files that no manifest names (gc's to collect)
    tmp_files: int = 0
    pointers: dict[str, str] = field(default_factory=dict)
    broken_pointers: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)  # ref -> created_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def violations(self, when: str, committed: dict[str, str]) -> list[str]:
        """What must never be, ``when`` (e.g. "after run 2"): a torn manifest or pointer, a manifest
        of ``committed`` (ref -> created_at) rewritten, a stage committed twice."""
        return (
            [f"{when}: torn {t}" for t in self.torn]
            + [f"{when}: broken pointer {name}: {why}" for name, why in self.broken_pointers.items()]
            + [
                f"{when}: {ref} changed after its commit (created {created} -> {self.created.get(ref)})"
                for ref, created in committed.items()
                if self.created.get(ref) != created
            ]
            + [
                f"{when}: {what} has {n} manifests (recomputed or committed twice)"
                for what, n in self.per_inputs.items()
                if n > 1
            ]
        )


def audit_store(store) -> Audit:
    """Read every ``stages/*/*/manifest.json`` (not only what ``list_manifests`` returns) and verify its files."""

    audit = Audit()
    files = store.backend.list_files(store.backend.join("stages"))
    named_attempts = set()
    for rel in sorted(files):
        parts = rel.split("/")
        if rel.endswith(".tmp") or ".tmp" in parts[-1]:
            audit.tmp_files += 1
        if len(parts) != 3 or parts[2] != "manifest.json":
            continue
        stage, key = parts[0], parts[1]
        audit.manifests += 1
        try:
            manifest = store.get(stage, key)
            store.verify(manifest)
        except Exception as error:  # noqa: BLE001 - every failure is a finding
            audit.torn.append(f"{stage}/{key}: {type(error).__name__}: {error}")
            continue
        audit.verified += 1
        audit.per_stage[stage] = audit.per_stage.get(stage, 0) + 1
        what = f"stage {stage} on {', '.join(sorted(manifest.inputs)) or 'no inputs'}"
        audit.per_inputs[what] = audit.per_inputs.get(what, 0) + 1
        audit.created[manifest.ref] = manifest.created_at
        named_attempts.update(
            f"{stage}/{key}/{entry.path.split('/')[0]}/{entry.path.split('/')[1]}"
            for entry in manifest.files.values()
            if entry.path.startswith("attempts/")
        )
    attempts = {
        "/".join(parts[:4]) for parts in (rel.split("/") for rel in files) if len(parts) > 4 and parts[2] == "attempts"
    }
    audit.staging_attempts = len(attempts - named_attempts)
    audit.pointers, audit.broken_pointers = store.scan_pointers()
    return audit


def stop_own_ray() -> None:
    """Stop the Ray :func:`ensure_ray_cluster` started here (its log lines would follow the figures)."""
    import ray

    if _STARTED_RAY and ray.is_initialized():
        ray.shutdown()
        os.environ.pop("RAY_ADDRESS", None)


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    """The figures: a table, or with ``--json`` one JSON object on the last line."""
    stop_own_ray()
    print("\n".join(lines), file=sys.stderr if as_json else sys.stdout, flush=True)
    if as_json:
        print(json.dumps(result, default=str), flush=True)


def print_json_last(figures: dict[str, Any]) -> None:
    """The ``--json`` contract: one JSON object, on the last line."""
    print(json.dumps(figures, sort_keys=True), flush=True)


# --------------------------------------------------------------------------- a tiny servable store


def tiny_vae(seed: int = 0, base_channels: int = 4) -> VAE:
    """An untrained 4x-downsampling VAE for 16x16 grayscale images (the weights are the seed's)."""
    torch.manual_seed(seed)
    return VAE(VAEConfig(in_channels=1, latent_channels=LATENT[0], base_channels=base_channels, downsample=4)).eval()


def vae_card(**changes: Any) -> dict[str, Any]:
    """The metrics of the tiny VAE's card as the vae stage writes them, with ``changes`` applied."""
    card = VAECard(
        latent_scale=1.0,
        latent_shape=LATENT,
        in_channels=1,
        image_size=IMAGE_SHAPE[0],
        latent_channels=LATENT[0],
        downsample=4,
        recon_mse_train=0.0,
        measured_on=0,
    )
    return {**card.to_metrics(), **changes}


def commit_vae(
    store: Store,
    inputs: Sequence[Manifest] = (),
    seed: int = 0,
    base_channels: int = 4,
    metrics: dict[str, Any] | None = None,
) -> Manifest:
    """:func:`tiny_vae` committed as the vae stage commits a VAE (``metrics``: its card, by default
    :func:`vae_card`); keyed by its seed, size and inputs."""
    vae = tiny_vae(seed, base_channels)
    config = {"seed": seed, "base_channels": base_channels}
    key = store.stage_key("vae", config, list(inputs))
    with store.begin("vae", key, config=config, inputs=list(inputs)) as writer:
        writer.write_model("vae", vae, model_spec(vae))
        return writer.commit(metrics=vae_card() if metrics is None else metrics)


def commit_generator(
    store: Store, stage: str, family: str, seed: int, vae: Manifest, poison: str | None = None, **card: Any
) -> Manifest:
    """An untrained DiT, nudged so that it depends on x, t and y; ``card``: the card fields its
    family's samplers read (e.g. a diffusion model's schedule). ``poison`` breaks it on purpose:

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
    key = f"tiny{seed}" + (f"-{poison}" if poison else "")
    with store.begin(stage, key, config={"seed": seed, "poison": poison}, inputs=[vae]) as writer:
        writer.write_model("model", net, model_spec(net))
        metrics = GeneratorCard(
            family=family,
            steps=0,
            latent_shape=LATENT,
            num_classes=NUM_CLASSES,
            latent_scale=1.0,
            vae_ref=vae.ref,
            **card,
        ).to_metrics()
        return writer.commit(metrics=metrics)


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


def builtin_folder(folder: str | Path, kind: str, start: int, stop: int, seed: int = 0) -> int:
    """Images ``start .. stop - 1`` of a built-in set (``digits`` or ``shapes``) written into an image
    folder, ``<class>/<kind>-<i>.png``, each with a fixed mtime: a folder that grows as a user's does.
    Returns how many files it wrote."""
    import numpy as np
    from PIL import Image

    if kind == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        stop = min(stop, len(digits.images))
        pixels = np.rint(digits.images[start:stop] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        labels, classes = digits.target[start:stop], [str(k) for k in range(10)]
    elif kind == "shapes":
        from workers.sources.shapes import SHAPE_CLASSES, render_shapes

        rendered = render_shapes(start, stop - start, seed)
        pixels, labels, classes = rendered.pixels, rendered.labels, list(SHAPE_CLASSES)
    else:
        raise ValueError(f"builtin_folder writes 'digits' or 'shapes', not {kind!r}")
    for offset, (image, label) in enumerate(zip(pixels, labels)):
        path = Path(folder) / classes[int(label)] / f"{kind}-{start + offset:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        os.utime(path, (1_700_000_000.0, 1_700_000_000.0))
    return len(pixels)


def tiny_store(root: str | Path) -> TinyStore:
    store = Store.open(str(root))
    vae = commit_vae(store)
    first = commit_generator(store, "consistency", "consistency", 1, vae)
    second = commit_generator(store, "base", "flow", 2, vae)
    nan = commit_generator(store, "base", "flow", 3, vae, poison="nan")
    overflow = commit_generator(store, "base", "flow", 4, vae, poison="overflow")
    corrupt = commit_generator(store, "base", "flow", 5, vae)
    flip_byte(store, corrupt)
    store.put_pointer(SERVING_POINTER, first.ref)
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


@contextmanager
def serving(store_uri: str, config: ServeConfig, model: str | None = None) -> Iterator[str]:
    """The real app (the code ``fewstep serve`` runs) on a free loopback port; Ray must be up."""
    from workers.serving import app as serve_app

    url = serve_app.start(store_uri, config, model, host="127.0.0.1", port=free_port())
    try:
        yield url
    finally:
        serve_app.stop()


@contextmanager
def serving_tiny_store(replicas: int = 1) -> Iterator[tuple[str, TinyStore, Path]]:
    """What a Serve drill runs against: Ray, a fresh :func:`tiny_store` and the app with ``replicas``:
    (url, the store, a work folder)."""
    ensure_ray_cluster(connect=True)
    workdir = Path(tempfile.mkdtemp(prefix="fewstep-drill-"))
    tiny = tiny_store(workdir / "store")
    with serving(tiny.store.uri, drill_config(replicas=replicas)) as url:
        yield url, tiny, workdir


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
