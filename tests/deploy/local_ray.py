"""Real Ray nodes for the deployment tests: ``ray start --block`` processes on this host.

Each node is one ``ray start --block`` in its own process group (``start_new_session``) with
its own temp dir. Everything the node runs (GCS, raylet, agents, workers) stays in that group,
so killing the group stops exactly that node, never another Ray on the machine (``ray stop``
would stop them all, including the test session's and other runs'). ``RayNode.kill`` then
sweeps any straggler whose command line names the node's temp dir, and ``assert_gone``
proves nothing of it is left.

Every port a node opens is chosen free up front (GCS, dashboard, dashboard agent, metrics,
runtime-env agent, Ray client server), so nodes of several clusters coexist on one host.
``--node-ip-address=127.0.0.1`` keeps everything on this host; Ray itself records the
host's own address for it (``ray._private.services.resolve_ip_for_localhost``).

Imported by the tests in this folder after ``sys.path.insert(0, <this folder>)``.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from drills.kit import free_port

RAY = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
# Token authentication on, with this run's own token: ``ray start`` turns it on by itself when
# ~/.ray/auth_token exists, and clients (the serve CLI, a driver) must then present it; saying
# so explicitly makes a fresh CI machine and a developer's one behave the same.
AUTH_TOKEN = secrets.token_hex(32)


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node: this one (PYTHONPATH, AWS_*), no RAY_ADDRESS, no usage stats."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_USAGE_STATS_ENABLED="0",
        PYTHONUNBUFFERED="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=AUTH_TOKEN,
        # On a busy 2-core machine a raylet may need more than Ray's 30 s to register with the GCS
        # or to hear from its agents, and a replacement node more than Ray Train's 60 s to take a
        # restarted worker group.
        RAY_raylet_start_wait_time_s="120",
        RAY_agent_register_timeout_ms="120000",
        RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S="300",
        **(extra or {}),
    )
    return env


@dataclass
class RayNode:
    """One ``ray start --block`` process group."""

    name: str
    process: subprocess.Popen
    temp_dir: Path
    log: Path
    gcs_address: str = ""
    dashboard_url: str | None = None
    ports: dict[str, int] = field(default_factory=dict)

    def alive(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""

    def diagnosis(self) -> str:
        """``ray start``'s output and the tail of the raylet's own error log."""
        errors = sorted(self.temp_dir.glob("session_*/logs/raylet.err"))
        raylet = errors[-1].read_text(errors="replace")[-3000:] if errors else "(no raylet.err)"
        return f"{self.output()}\n--- raylet.err ---\n{raylet}"

    def wait_started(self, timeout_s: float = 240) -> None:
        """Until ``ray start`` says it blocks (every process of the node is up)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"ray node {self.name} exited with {self.process.returncode}:\n{self.diagnosis()}")
            if "will now block forever" in self.output():
                return
            time.sleep(0.3)
        raise RuntimeError(f"ray node {self.name} did not start within {timeout_s}s:\n{self.diagnosis()}")

    def ready(self) -> RayNode:
        """Wait until started (killing the node if it does not start); learn the head's GCS address."""
        try:
            self.wait_started()
            if not self.gcs_address:
                self.gcs_address = (self.temp_dir / "ray_current_cluster").read_text().strip()
        except BaseException:
            self.kill()
            raise
        return self

    def pids(self) -> list[int]:
        """Every live process of this node: its process group and anything naming its temp dir."""
        found = []
        marker = str(self.temp_dir).encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                if os.getpgid(pid) == self.process.pid or marker in (entry / "cmdline").read_bytes():
                    state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                    if state != "Z":
                        found.append(pid)
            except (OSError, ProcessLookupError):
                continue
        return found

    def kill(self) -> None:
        """SIGKILL the node's process group and every straggler of it; reap the ``ray start``."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            left = self.pids()
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def assert_gone(self) -> None:
        left = self.pids()
        assert not left, f"processes of ray node {self.name} survived: {left}"


def start_node(
    name: str,
    *,
    head_address: str | None = None,
    num_cpus: int,
    resources: dict | None = None,
    dashboard: bool = False,
    env: dict[str, str] | None = None,
    wait: bool = True,
    attempts: int = 1,
) -> RayNode:
    """Start a head (``head_address=None``) or a worker node joining ``head_address``; with
    ``wait=False`` return at once and call :meth:`RayNode.ready` later (nodes boot in parallel).
    With ``attempts`` > 1 (and ``wait``), a node that fails to start is removed and started afresh."""
    for attempt in range(1, attempts + 1):
        node = _spawn_node(name, head_address, num_cpus, resources, dashboard, env)
        if not wait:
            return node
        try:
            return node.ready()
        except RuntimeError as error:
            remove(node)
            if attempt == attempts:
                raise
            print(f"ray node {name} failed to start (attempt {attempt} of {attempts}); again:\n{error}")
    raise AssertionError("unreachable")


def _spawn_node(
    name: str,
    head_address: str | None,
    num_cpus: int,
    resources: dict | None,
    dashboard: bool,
    env: dict[str, str] | None,
) -> RayNode:
    temp_dir = Path(tempfile.mkdtemp(prefix=f"fs-{name}-", dir="/tmp"))  # short: Ray's sockets live under it
    ports = {
        "agent_listen": free_port(),
        "agent_grpc": free_port(),
        "metrics": free_port(),
        "runtime_env_agent": free_port(),
    }
    args = [
        *RAY,
        "start",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        f"--dashboard-agent-listen-port={ports['agent_listen']}",
        f"--dashboard-agent-grpc-port={ports['agent_grpc']}",
        f"--metrics-export-port={ports['metrics']}",
        f"--runtime-env-agent-port={ports['runtime_env_agent']}",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ]
    if resources:
        args.append(f"--resources={json.dumps(resources)}")
    dashboard_url = None
    if head_address is None:
        ports.update(gcs=free_port(), client=free_port())
        args += ["--head", f"--port={ports['gcs']}", f"--ray-client-server-port={ports['client']}"]
        if dashboard:
            ports["dashboard"] = free_port()
            args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={ports['dashboard']}"]
            dashboard_url = f"http://127.0.0.1:{ports['dashboard']}"
        else:
            args += ["--include-dashboard=false"]
    else:
        args += [f"--address={head_address}"]
    log = temp_dir / "ray-start.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            args, stdout=sink, stderr=subprocess.STDOUT, env=node_env(env), start_new_session=True, cwd=temp_dir
        )
    return RayNode(
        name, process, temp_dir, log, dashboard_url=dashboard_url, ports=ports, gcs_address=head_address or ""
    )


def remove(node: RayNode) -> None:
    """Kill the node, prove it gone, delete its temp dir."""
    node.kill()
    node.assert_gone()
    shutil.rmtree(node.temp_dir, ignore_errors=True)
    if node.temp_dir.exists():  # a log flushed by a dying process: once more, now that all are gone
        shutil.rmtree(node.temp_dir, ignore_errors=True)
