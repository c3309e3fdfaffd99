"""Prefect the way teams run it: the repository's ``prefect.yaml`` deployed (``prefect deploy --all``)
to the session's real ``prefect server``, a process work pool, a ``prefect worker start`` subprocess, and a run
triggered with ``prefect deployment run``. The run completes with every stage as a task run and
the artifacts in the UI; ``fewstep schedule --register-only --work-pool`` registers the same flow
on the same pool from the command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from drills.kit import TINY, stop_group
from infra.config import load_config
from infra.store import SERVING_POINTER, Store

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
POOL = "fewstep"
DEPLOYMENT = "pipeline/fewstep-weekly"
TASKS = {"ingest", "vae", "latents", "base", "pairs-1", "reflow-1", "consistency", "features", "evaluate", "promote"}
ARTIFACTS = {
    "fewstep-run-summary",
    "fewstep-run-report",
    "fewstep-fid-vs-steps",
    "fewstep-evaluation-report",
    "fewstep-base-metrics",
    "fewstep-latents-metrics",
}


def kill_flow_run(flow_run_id: str) -> None:
    """SIGKILL the process group of a flow run the worker started (Prefect puts it in its own session);
    found by the PREFECT__FLOW_RUN_ID in its environment. Nothing to do when it has finished."""
    marker = f"PREFECT__FLOW_RUN_ID={flow_run_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                group = os.getpgid(int(entry.name))
                if group != os.getpgrp():  # never this test's own group
                    os.killpg(group, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            continue


def prefect(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    done = subprocess.run([*PREFECT, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_prefect_yaml_on_a_process_work_pool(prefect_server, ray_local, tmp_path):
    env = dict(
        os.environ,
        PREFECT_API_URL=prefect_server.url,
        PYTHONUNBUFFERED="1",
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
    )
    manifest = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    (declared,) = manifest["deployments"]
    assert declared["entrypoint"] == "flows/pipeline.py:pipeline" and declared["work_pool"]["name"] == POOL

    prefect("work-pool", "create", POOL, "--type", "process", env=env)
    prefect("--no-prompt", "deploy", "--all", env=env)
    (deployment,) = [d for d in prefect_server.api("/deployments/filter") if d["name"] == "fewstep-weekly"]
    assert deployment["work_pool_name"] == POOL and deployment["entrypoint"] == "flows/pipeline.py:pipeline"
    assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 3 * * 0"]
    assert set(deployment["parameters"]) == {"config", "store_uri", "ray_address"}

    store_uri = str(tmp_path / "store")
    config = load_config("quick", overrides=TINY).model_dump(mode="json")
    log = tmp_path / "worker.log"
    with open(log, "wb") as sink:
        worker = subprocess.Popen(
            [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process"],
            env=env,
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    flow_run_id = None
    try:
        started = prefect(
            "deployment", "run", DEPLOYMENT, "--params", json.dumps({"config": config, "store_uri": store_uri}), env=env
        )
        flow_run_id = next(line.split()[-1] for line in started.stdout.splitlines() if "UUID" in line)
        deadline = time.monotonic() + 720
        while True:
            run = prefect_server.api(f"/flow_runs/{flow_run_id}", method="GET")
            if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, f"the worker exited:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"the run is still {run['state_type']}:\n{log.read_text()[-4000:]}"
            time.sleep(2)
        assert run["state_type"] == "COMPLETED", log.read_text()[-6000:]
        assert run["work_pool_name"] == POOL and run["parameters"]["store_uri"] == store_uri
    finally:
        stop_group(worker)
        if flow_run_id is not None:
            kill_flow_run(flow_run_id)  # only if it outlived a failed wait

    task_runs = prefect_server.api("/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run_id]}}})
    states = {t["name"]: t["state_type"] for t in task_runs}
    assert TASKS <= set(states) and all(states[name] == "COMPLETED" for name in TASKS), states
    artifacts = prefect_server.api("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}})
    assert ARTIFACTS <= {a["key"] for a in artifacts if a.get("key")}, artifacts
    store = Store.open(store_uri)
    assert {m.stage for m in store.list_manifests()} >= {
        "ingest",
        "vae",
        "latents",
        "base",
        "pairs",
        "reflow",
        "consistency",
        "features",
        "evaluate",
    }
    assert store.get_pointer(SERVING_POINTER) is not None

    # The command-line alternative registers the same flow on the same pool.
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(yaml.safe_dump(TINY))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.cli",
            "schedule",
            "--cron",
            "30 2 * * *",
            "--register-only",
            "--work-pool",
            POOL,
            "--name",
            "nightly",
            "--preset",
            "quick",
            "--config",
            str(config_file),
            "--store",
            store_uri,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0 and f"work pool '{POOL}'" in done.stdout, done.stdout + done.stderr
    (nightly,) = [d for d in prefect_server.api("/deployments/filter") if d["name"] == "nightly"]
    assert nightly["work_pool_name"] == POOL and nightly["entrypoint"] == "flows.pipeline.pipeline"
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["30 2 * * *"]
    assert nightly["parameters"]["config"]["base"]["steps"] == TINY["base"]["steps"]
