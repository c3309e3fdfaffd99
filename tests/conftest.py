"""The real components the tests share, one fixture each, started once per session when first asked for.

S3: ``s3_server`` starts one real S3 endpoint for the session (moto's server mode in a
subprocess on a free 127.0.0.1 port) with IAM authentication on, so wrong credentials are
refused as on AWS. It creates one IAM user with an allow-all policy and exports that user's
keys and the endpoint as the standard AWS variables, so anything that reads them (the store,
s3fs, boto3, subprocesses, Ray workers started afterwards) talks to it. Nothing starts
until a test asks for it.

``store_uri`` / ``store`` are parametrised over ``local`` (a fresh folder) and ``s3`` (a
fresh bucket on that endpoint): a test that takes ``store`` runs once per backend.

Ray: ``ray_local``, one local cluster. Prefect: ``prefect_server``, one ``prefect server start``;
``prefect_harness`` points flows called in this process at it. The servers are drills/kit.py's
(the drills run the same ones); so is the tiny servable store (``kit.commit_vae``,
``kit.commit_generator``) that tests import directly.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pytest

# No phoning home from the tests' Prefect servers and Ray clusters (the machine is offline).
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

MOTO_REGION = "us-east-1"
# The requests moto serves before it starts checking credentials: exactly the IAM setup below.
MOTO_SETUP_REQUESTS = 3
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}


@dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = MOTO_REGION

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self, service: str = "s3", **keys: str):
        import boto3

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=keys.get("key", self.access_key_id),
            aws_secret_access_key=keys.get("secret", self.secret_access_key),
        )


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 endpoint with IAM auth; its endpoint and keys are exported as AWS_* variables."""
    from drills import kit

    moto = kit.MotoServer(
        tmp_path_factory.mktemp("moto") / "server.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": str(MOTO_SETUP_REQUESTS)}
    )
    monkeypatch = pytest.MonkeyPatch()
    try:
        iam = S3Server(moto.url, "setup", "setup").client("iam")
        iam.create_user(UserName="fewstep-tests")
        iam.put_user_policy(UserName="fewstep-tests", PolicyName="allow-all", PolicyDocument=json.dumps(ALLOW_ALL))
        key = iam.create_access_key(UserName="fewstep-tests")["AccessKey"]
        server = S3Server(moto.url, key["AccessKeyId"], key["SecretAccessKey"])
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            monkeypatch.delenv(name, raising=False)
        missing = str(tmp_path_factory.mktemp("aws") / "none")
        monkeypatch.setenv("AWS_CONFIG_FILE", missing)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", missing)
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        yield server
    finally:
        monkeypatch.undo()
        moto.stop()


@pytest.fixture
def s3_uri(s3_server) -> str:
    """``s3://<fresh bucket>/store`` on the session's S3 endpoint."""
    bucket = f"fewstep-test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=bucket)
    return f"s3://{bucket}/store"


@pytest.fixture(params=["local", "s3"])
def store_uri(request, tmp_path) -> str:
    """A fresh, empty store location: a local folder, then a bucket on the session's S3 endpoint."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


@pytest.fixture
def store(store_uri):
    """``Store.open(store_uri)``: every test that takes it runs on a local folder and on S3."""
    from infra.store import Store

    return Store.open(store_uri)


@pytest.fixture
def local_store(tmp_path):
    """A store in a fresh local folder, for tests that need no S3."""
    from infra.store import Store

    return Store.open(str(tmp_path / "store"))


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray for the whole session, started after S3 so its workers see the AWS_* variables.

    Four logical CPUs on a 2-core machine: a Train worker and the Data actors feeding it fit.
    RAY_ADDRESS is exported so subprocesses (the CLI under test) attach to it.
    """
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    if not ray.is_initialized():
        # address="local": always a cluster of our own, never one another process started on this machine
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    os.environ.pop("RAY_ADDRESS", None)
    ray.shutdown()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` for the session, with its own home and database
    (:class:`drills.kit.PrefectServer`: ``.url`` is its API, ``.api(path, body)`` calls it).

    Every test that talks to Prefect shares it, so a test reads back only its own flow runs."""
    from drills import kit

    server = kit.PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def prefect_harness(prefect_server):
    """Flows called in this process report to the session's Prefect server."""
    from prefect.context import _temporary_global_settings_context, get_settings_context
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: prefect_server.url}):
        # Also the process-wide settings, for code in a context copied before this one (Prefect's harness does the same).
        with _temporary_global_settings_context(get_settings_context()):
            yield prefect_server
            # The flows' last log lines and events, sent before the server stops.
            APILogWorker.drain_all()
            EventsWorker.drain_all()
