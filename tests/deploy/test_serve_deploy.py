"""``fewstep serve --emit-config`` as an operator uses it: the emitted file, ``serve deploy``-ed with
Ray's own CLI onto a real ``ray start --head`` (dashboard on a free port), answers over HTTP and
``serve status`` reports it healthy; ``serve shutdown`` takes it down and the head is stopped by
killing only its own process group.

The store is on the session's S3 endpoint (moto): the head node has the S3 keys in its
environment, the file has none of them, and the replicas still read the store.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))

from local_ray import free_port, node_env, remove, start_node  # noqa: E402

from drills import kit  # noqa: E402
from infra.store import SERVING_POINTER, Store  # noqa: E402

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SERVE = [sys.executable, "-c", "from ray.serve.scripts import cli; cli()"]
SERVE_YAML = """
serve:
  steps: 2
  max_n: 8
  max_steps: 4
  max_batch_size: 8
  max_ongoing_requests: 16
  poll_s: 0.5
  resources: {workers: 1, cpus: 0.5}
"""


def fewstep(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], env=env, capture_output=True, text=True, timeout=180
    )


def serve_cli(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], env=env, capture_output=True, text=True, timeout=timeout)


def wait_healthy(url: str, head, timeout_s: float = 240) -> None:
    """Until the deployed app answers /healthz (polling HTTP; ``serve status`` is checked once, after)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert head.alive(), f"the head node died:\n{head.output()}"
        try:
            if httpx.get(f"{url}/healthz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"the deployed app did not answer {url}/healthz within {timeout_s}s")


def test_emitted_config_deploys_on_a_real_cluster_and_serves(s3_uri, s3_server, tmp_path):
    started = time.monotonic()

    def phase(name: str) -> None:
        print(f"{name}: {time.monotonic() - started:.1f}s")

    head = start_node("serve-head", num_cpus=2, dashboard=True, wait=False)  # boots while the config is written
    try:
        deploy_and_serve(head, s3_uri, s3_server, tmp_path, phase)
    finally:
        remove(head)
        phase("head removed")


def deploy_and_serve(head, s3_uri: str, s3_server, tmp_path, phase) -> None:
    store = Store.open(s3_uri)
    vae = kit.commit_vae(store)
    student = kit.commit_generator(store, "consistency", "consistency", 1, vae)
    flow = kit.commit_generator(store, "base", "flow", 2, vae)  # never promoted
    store.put_pointer(SERVING_POINTER, student.ref)
    env = node_env()
    http_port = free_port()
    config = tmp_path / "fewstep.yaml"
    config.write_text(SERVE_YAML)
    emitted = tmp_path / "serve.yaml"

    done = fewstep(
        "serve",
        "--emit-config",
        str(emitted),
        "--store",
        s3_uri,
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(http_port),
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = emitted.read_text()
    assert s3_server.secret_access_key not in text and s3_server.access_key_id not in text, text
    from workers.serving.deploy import IMPORT_PATH, validate

    schema = validate(yaml.safe_load(text))  # Ray's ServeDeploySchema and fewstep's AppArgs
    (app,) = schema.applications
    assert app.import_path == IMPORT_PATH and app.route_prefix == "/"
    assert app.args["store"] == s3_uri and app.args["model"] is None and app.args["serve"]["steps"] == 2
    assert app.runtime_env["env_vars"]["AWS_ENDPOINT_URL"] == s3_server.endpoint_url
    assert schema.http_options.port == http_port

    status_, out, err = emit("--emit-config", "--store", s3_uri, "--model", flow.ref, "--config", str(config))
    assert status_ == 0, err
    assert validate(yaml.safe_load(out)).applications[0].args["model"] == flow.ref  # pinned: ignores promotions
    phase("emitted")
    head.ready()
    phase("head started")
    deployed = serve_cli("deploy", str(emitted), "-a", head.dashboard_url, env=env)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    phase("deployed")
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_healthy(url, head)
    except AssertionError as error:  # say why: Serve's own view of the app (e.g. a replica's constructor error)
        status = serve_cli("status", "-a", head.dashboard_url, env=env)
        raise AssertionError(f"{error}\nserve status:\n{status.stdout}{status.stderr}") from None
    phase("running")
    done = serve_cli("status", "-a", head.dashboard_url, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    app_status = yaml.safe_load(done.stdout)["applications"]["fewstep"]
    assert app_status["status"] == "RUNNING", done.stdout
    assert app_status["deployments"]["FewstepGenerator"]["status"] == "HEALTHY", done.stdout
    with httpx.Client(base_url=url, timeout=60) as client:
        health = client.get("/healthz")
        assert health.status_code == 200 and health.json()["status"] == "ok", health.text
        assert health.json()["model"] == student.ref
        response = client.post("/v1/generate", json={"n": 2, "labels": [0, kit.NUM_CLASSES - 1], "seed": 5})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == student.ref and body["steps"] == 2 and body["shape"] == kit.IMAGE_SHAPE
        pixels = [np.asarray(Image.open(io.BytesIO(base64.b64decode(png)))) for png in body["images"]]
        assert len(pixels) == 2 and pixels[0].shape == (16, 16) and len(np.unique(pixels[0])) > 8
        again = client.post("/v1/generate", json={"n": 2, "labels": [0, kit.NUM_CLASSES - 1], "seed": 5}).json()
        assert again["images"] == body["images"]  # same seed, same images
        assert client.post("/v1/generate", json={"n": 9}).status_code == 422  # the emitted limits hold
        assert client.get("/v1/model").json()["ref"] == student.ref

    phase("served")
    down = serve_cli("shutdown", "-a", head.dashboard_url, "-y", env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(f"{url}/healthz", timeout=5)
        except httpx.TransportError:
            break  # the proxy is gone
        assert time.monotonic() < deadline, "Serve still answered after `serve shutdown`"
        time.sleep(1)
    phase("shut down")


def emit(*args: str) -> tuple[int, str, str]:
    """``fewstep serve --emit-config ...`` in this process: (exit status, stdout, stderr)."""
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(["serve", *args])
        except SystemExit as exit_:
            status = exit_.code or 0
    return status, out.getvalue(), err.getvalue()


def test_emit_config_refuses_literal_secrets_and_bad_refs(local_store, tmp_path):
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text("env_vars: {AWS_SECRET_ACCESS_KEY: hunter2}\n")
    status, out, err = emit("--emit-config", "--store", local_store.uri, "--runtime-env", str(runtime_env))
    assert status == 2 and "must not hold secrets" in err and "hunter2" not in out + err, (status, out, err)

    runtime_env.write_text("env_vars: {AWS_SECRET_ACCESS_KEY: '${TEAM_S3_SECRET}', LOG_LEVEL: debug}\n")
    status, out, err = emit("--emit-config", "--store", local_store.uri, "--runtime-env", str(runtime_env))
    assert status == 0, err
    emitted = yaml.safe_load(out)
    assert emitted["applications"][0]["runtime_env"]["env_vars"] == {
        "AWS_SECRET_ACCESS_KEY": "${TEAM_S3_SECRET}",
        "LOG_LEVEL": "debug",
    }
    assert emitted["applications"][0]["args"]["store"] == local_store.uri

    status, out, err = emit("--emit-config", "--store", local_store.uri, "--model", "base/nothing")
    assert status == 2 and "base/nothing" in err and "Traceback" not in err, err
    status, out, err = emit("out.yaml", "--store", local_store.uri)
    assert status == 2 and "only used with --emit-config" in err, err


def test_a_pinned_config_pins_its_model_until_unpinned(local_store):
    """A Serve config outlives the command that wrote it: its pinned model must survive gc until released."""
    from flows.cli import main

    flow = kit.commit_generator(local_store, "base", "flow", 0, kit.commit_vae(local_store))
    status, out, err = emit("--emit-config", "--store", local_store.uri, "--model", flow.ref)
    assert status == 0, err
    name = "serve-config-" + flow.ref.replace("/", "-")
    assert local_store.list_pins() == {name: flow.ref} and f"fewstep unpin {name}" in err, err

    def unpin(*args: str) -> tuple[int, str]:
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(["unpin", *args])
            except SystemExit as exit_:
                return exit_.code or 0, out.getvalue() + err.getvalue()
        return 0, out.getvalue() + err.getvalue()

    status, text = unpin("serve-config-nothing", "--store", local_store.uri)
    assert status == 2 and name in text and "Traceback" not in text, text  # names the pins there are
    status, text = unpin(name, "--store", local_store.uri)
    assert status == 0 and local_store.list_pins() == {}, text
