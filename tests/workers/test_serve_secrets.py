"""Nothing secret leaves the environment: not into Serve's controller, logs, manifests or Prefect.

The S3 endpoint of tests/conftest.py authenticates with a real IAM key pair, exported as the
AWS_* variables. A replica opens the store from its URI with the credentials of its own
environment, so the secret key must appear nowhere that Ray, Serve or Prefect keep or show:
Serve's deployment config and status, the controller's checkpoints in the GCS key-value store
(where a pickled Store would carry it), the session's log files, and, after a whole pipeline
run on S3 (the slow test), the run's console output, Prefect's logs, flow-run parameters and
artifacts, and every object in the bucket.

Each search is paired with a control that shows it looks at the right bytes (the bucket name
must be found where the secret must not be).
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from drills import kit
from infra.errors import AccessDenied
from infra.store import SERVING_POINTER, Store

pytestmark = pytest.mark.timeout(600)


def serve_state() -> bytes:
    """Everything Serve keeps about its apps, as bytes: status, details and the controller's checkpoints."""
    import ray
    from ray import serve
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_list
    from ray.serve.context import _get_global_client

    parts = [repr(serve.status()).encode(), json.dumps(_get_global_client().get_serve_details(), default=str).encode()]
    assert ray.is_initialized()
    keys = _internal_kv_list(b"", namespace=b"serve")  # the controller's checkpoints (Serve's RayInternalKVStore)
    assert any(b"deployment-state-checkpoint" in key for key in keys), keys
    parts += [key + b"=" + (_internal_kv_get(key, namespace=b"serve") or b"") for key in keys]
    return b"\n".join(parts)


def ray_log_files() -> list[Path]:
    """Every file under this Ray session's logs folder (Ray exposes its path only on the node object)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [path for path in logs.rglob("*") if path.is_file()]


def files_holding(paths: list[Path], needle: bytes) -> list[str]:
    return [str(path) for path in paths if needle in path.read_bytes()]


def test_serve_keeps_and_logs_no_secret(ray_local, s3_server, s3_uri):
    secret, bucket = s3_server.secret_access_key.encode(), s3_uri.split("/")[2].encode()
    store = Store.open(s3_uri)
    # Control: a pickled Store carries the secret, which is why the app binds the URI instead.
    assert secret in pickle.dumps(store)
    vae = kit.commit_vae(store)
    model = kit.commit_generator(store, "consistency", "consistency", 1, vae)
    store.put_pointer(SERVING_POINTER, model.ref)

    with kit.serving(s3_uri, kit.drill_config()) as url:
        response = httpx.post(url + "v1/generate", json={"n": 1, "seed": 1}, timeout=60)
        assert response.status_code == 200 and response.json()["model"] == model.ref
        assert kit.health(url)["status"] == "ok"
        state = serve_state()
    assert bucket in state, "the search does not see the deployment's arguments"
    assert secret not in state, "the secret key is in Serve's controller state"
    assert s3_server.access_key_id.encode() not in state

    logs = ray_log_files()
    assert files_holding(logs, bucket), "the search does not see the replicas' logs"
    assert files_holding(logs, secret) == []
    print(f"searched {len(state)} bytes of Serve state and {len(logs)} Ray log files")


def test_access_denied_names_neither_key(s3_server, s3_uri):
    """A key pair the endpoint knows but whose user may do nothing: AccessDenied, without the key id."""
    iam = s3_server.client("iam")
    iam.create_user(UserName="fewstep-no-rights")
    key = iam.create_access_key(UserName="fewstep-no-rights")["AccessKey"]
    with pytest.raises(AccessDenied, match=r"access denied to s3://.* \(the configured access key") as caught:
        Store.open(s3_uri, access_key_id=key["AccessKeyId"], secret_access_key=key["SecretAccessKey"])
    message = str(caught.value)
    assert key["AccessKeyId"] not in message and key["SecretAccessKey"] not in message, message


# --------------------------------------------------------------------------- after a whole run on S3


def prefect_records(api_url: str) -> bytes:
    """Prefect's logs, flow runs (with their parameters), task runs and artifacts, as JSON bytes."""
    out = []
    with httpx.Client(base_url=api_url, timeout=60) as client:
        for path in ("/logs/filter", "/flow_runs/filter", "/task_runs/filter", "/artifacts/filter"):
            rows, offset = [], 0
            while True:
                page = client.post(path, json={"limit": 200, "offset": offset})
                page.raise_for_status()
                rows += page.json()
                if len(page.json()) < 200:
                    break
                offset += 200
            out.append((path, rows))
    return json.dumps(out).encode()


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_no_secret_anywhere_after_an_s3_run_and_serve(prefect_harness, ray_local, s3_server, s3_uri, tmp_path):
    from prefect.settings import PREFECT_API_URL

    secret, bucket = s3_server.secret_access_key.encode(), s3_uri.split("/")[2]
    port = kit.free_port()
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump({**kit.TINY, "serve": {**kit.TINY["serve"], "host": "127.0.0.1", "port": port, "poll_s": 0.5}})
    )
    api_url = PREFECT_API_URL.value()
    env = dict(os.environ, PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1")
    console = tmp_path / "console.log"
    with open(console, "wb") as sink:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "flows.cli",
                "run",
                "--preset",
                "quick",
                "--config",
                str(config),
                "--store",
                s3_uri,
                "--serve",
                "--verbose",
            ],
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        kit.wait_for(
            lambda: process.poll() is not None or "fewstep: serving" in console.read_text(),
            1000,
            "the run to finish and serve",
            poll_s=1,
        )
        assert process.poll() is None, console.read_text()[-4000:]
        url = f"http://127.0.0.1:{port}/"
        assert httpx.post(url + "v1/generate", json={"n": 2}, timeout=60).status_code == 200
        state = serve_state()
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode == 0, console.read_text()[-4000:]

    s3 = s3_server.client()
    objects = [
        o["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for o in page.get("Contents", [])
    ]
    manifests = [key for key in objects if key.endswith("manifest.json")]
    holding = [key for key in objects if secret in s3.get_object(Bucket=bucket, Key=key)["Body"].read()]
    prefect = prefect_records(api_url)
    logs = [console, *ray_log_files()]

    assert len(manifests) >= 9 and bucket.encode() in state and bucket.encode() in prefect  # the controls
    assert holding == [], f"store objects holding the secret key: {holding}"
    assert secret not in state, "the secret key is in Serve's controller state"
    assert secret not in prefect, "the secret key is in Prefect's logs, runs or artifacts"
    assert files_holding(logs, secret) == []
    print(
        f"secret key absent from {len(objects)} store objects ({len(manifests)} manifests), {len(prefect)} bytes of "
        f"Prefect records, {len(state)} bytes of Serve state, {len(logs)} log files"
    )
