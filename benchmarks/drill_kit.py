"""What the fault drills share: the configs, a Prefect server, an S3 endpoint that can be stopped,
``fewstep run`` as a watched subprocess, and the audit of a store after the faults.

Used by ``benchmarks/kill_drill.py`` and ``benchmarks/s3_outage_drill.py`` (and, through them,
``tests/flows/test_fault_drills.py``). Everything here is real: a ``prefect server`` process,
moto's S3 server, a TCP relay in front of it that can refuse connections, the CLI as a user
runs it, one local Ray cluster for all runs.
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
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from workers.stages import STAGE_MODULES  # noqa: E402

OPTIONAL_STAGES = ("ddpm",)  # off unless the config turns it on
# The pipeline's stages in the order a run reaches them, and "promote" (after evaluate commits).
STAGES = tuple(stage for stage in STAGE_MODULES if stage not in OPTIONAL_STAGES)
KILLABLE = (*STAGES, "promote")
# The feature-space section of the config (named after its stage).
FEATURES = "features"

# tests/flows/test_pipeline.py's TINY: the quick preset, smaller still; every stage runs.
TINY: dict[str, Any] = {
    "ingest": {"limit": 240},
    "vae": {"steps": 30, "base_channels": 8, "batch_size": 32},
    "base": {"steps": 40, "batch_size": 32, "checkpoint_every": 10},
    "pairs": {"pairs": 64, "steps": 2, "batch_size": 64},
    "reflow": {"steps": 10, "batch_size": 32, "checkpoint_every": 5},
    "consistency": {"intervals": 4, "steps": 10, "batch_size": 32, "checkpoint_every": 5},
    FEATURES: {"steps": 30, "batch_size": 32},
    "evaluate": {"n": 32, "flow_steps": [1, 2], "flow_solvers": ["euler"], "consistency_steps": [1]},
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
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def log(message: str) -> None:
    print(f"[drill {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- Ray and Prefect


def ensure_ray_cluster() -> str:
    """The Ray every run attaches to: ``RAY_ADDRESS`` if set (e.g. the tests' ``ray_local``), else
    a local one started in this process (stopped when it exits). Exported as RAY_ADDRESS."""
    address = os.environ.get("RAY_ADDRESS")
    if address and address not in ("local", "auto"):
        return address
    import ray

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

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


# --------------------------------------------------------------------------- an S3 endpoint that can fail


class MotoServer:
    """moto's S3 server in its own process group, without IAM (any keys are accepted).

    :meth:`pause` / :meth:`resume` SIGSTOP / SIGCONT it: the endpoint still accepts TCP
    connections (the kernel does) but answers nothing, as a hung server does. Its state is in
    memory, so a real restart would empty it; a refused endpoint is :class:`TcpRelay`'s job.
    """

    KEY, SECRET, REGION = "drill-key", "drill-secret", "us-east-1"

    def __init__(self, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with open(log_path, "wb") as sink:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
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
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


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
    staging_attempts: int = 0  # attempt folders with files that no manifest names (gc's to collect)
    tmp_files: int = 0
    pointers: dict[str, str] = field(default_factory=dict)
    broken_pointers: dict[str, str] = field(default_factory=dict)
    created: dict[str, str] = field(default_factory=dict)  # ref -> created_at

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
