"""Bad input gets one clear error each; transient failures are retried, permanent ones are not."""

from __future__ import annotations

import errno
import socket

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from infra.errors import (
    AccessDenied,
    BucketNotFound,
    EndpointUnreachable,
    InvalidStoreURI,
    RetryPolicy,
    StoreUnavailable,
    UnknownScheme,
    is_transient_store_error,
    retry_transient,
)
from infra.s3 import resolve_settings
from infra.store import Store


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject"
    )


# ---------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "uri, error, words",
    [
        ("ftp://x", UnknownScheme, ["'ftp://x'", "s3://bucket/prefix"]),
        ("gs://bucket/p", UnknownScheme, ["'gs'"]),
        ("s3://", InvalidStoreURI, ["names no bucket"]),
        ("s3://Bad_Bucket!/p", InvalidStoreURI, ["'Bad_Bucket!'", "not valid"]),
    ],
)
def test_malformed_uris(uri, error, words, s3_server):
    with pytest.raises(error) as caught:
        Store.open(uri)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_a_local_store_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(InvalidStoreURI, match="is a file"):
        Store.open(str(tmp_path / "f"))


def test_missing_bucket(s3_server):
    with pytest.raises(
        BucketNotFound, match=r"bucket 'fewstep-missing-bucket' does not exist at http://127\.0\.0\.1:\d+; create it"
    ):
        Store.open("s3://fewstep-missing-bucket/store")


def test_wrong_credentials(s3_uri, s3_server, monkeypatch):
    with pytest.raises(
        AccessDenied, match=r"rejected the credentials \(the configured access key.*InvalidAccessKeyId"
    ) as caught:
        Store.open(s3_uri, access_key_id="AKIAWRONGWRONG", secret_access_key="nope")
    assert "AKIAWRONGWRONG" not in str(caught.value)  # key ids end up in logs and bug reports
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # a real key id with a wrong secret
    with pytest.raises(AccessDenied, match="SignatureDoesNotMatch.*AWS_SECRET_ACCESS_KEY") as caught:
        Store.open(s3_uri)
    assert s3_server.access_key_id not in str(caught.value)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(AccessDenied, match="found no S3 credentials"):
        Store.open(s3_uri)


def test_unreachable_endpoint(s3_uri):
    port = closed_port()
    with pytest.raises(
        EndpointUnreachable, match=rf"no S3 endpoint answered at http://127\.0\.0\.1:{port} .*AWS_ENDPOINT_URL"
    ):
        Store.open(s3_uri, endpoint_url=f"http://127.0.0.1:{port}")


def test_endpoint_and_keys_come_from_the_aws_variables():
    env = {
        "AWS_ENDPOINT_URL": "http://a:1",
        "AWS_ENDPOINT_URL_S3": "http://s3:2",
        "AWS_DEFAULT_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }
    settings = resolve_settings("s3://b/p/q/", env=env)
    assert (settings.bucket, settings.prefix, settings.endpoint_url, settings.region) == (
        "b",
        "p/q",
        "http://s3:2",
        "eu-west-1",
    )
    assert (settings.access_key_id, settings.secret_access_key) == ("id", "secret")
    explicit = resolve_settings("s3://b", endpoint_url="http://x:3", region="us-west-2", env=env)
    assert (explicit.endpoint_url, explicit.region, explicit.uri) == ("http://x:3", "us-west-2", "s3://b")
    with pytest.raises(InvalidStoreURI, match="not an http"):
        resolve_settings("s3://b", endpoint_url="localhost:9000", env={})


# ---------------------------------------------------------------------------------------
# Retries


@pytest.mark.parametrize(
    "error, transient",
    [
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("ConditionalRequestConflict", 409), True),
        (client_error("AccessDenied", 403), False),
        (client_error("NoSuchKey", 404), False),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (TimeoutError("read timed out"), True),
        (FileNotFoundError("x"), False),
        (ValueError("bad config"), False),
        # pyarrow's S3 filesystem (Ray Data's reads and writes): no errno, the kind is in the message.
        (
            OSError(
                "When getting information for key 'k' in bucket 'b': AWS Error NETWORK_CONNECTION during "
                "HeadObject operation: curlCode: 7, Could not connect to server"
            ),
            True,
        ),
        (
            OSError(
                "When reading 'k': AWS Error SLOW_DOWN during GetObject operation: Please reduce your request rate"
            ),
            True,
        ),
        (OSError("When getting information for key 'k': AWS Error ACCESS_DENIED during HeadObject operation"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(error, transient):
    assert is_transient_store_error(error) is transient
    wrapped = OSError(errno.EIO, "s3fs wrapper")  # s3fs raises OSErrors caused by botocore's
    wrapped.__cause__ = error
    assert is_transient_store_error(wrapped) is transient


def test_transient_errors_are_retried_with_growing_backoff():
    calls, waits = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise client_error("SlowDown", 503)
        return "ok"

    policy = RetryPolicy(attempts=5, base_delay_s=0.1, max_delay_s=10)
    assert retry_transient(flaky, policy=policy, sleep=waits.append) == "ok"
    assert len(calls) == 3 and len(waits) == 2
    assert 0.05 <= waits[0] <= 0.1 and 0.1 <= waits[1] <= 0.2  # base * 2**k, jittered to [0.5, 1]


def test_permanent_errors_are_not_retried():
    calls = []

    def denied():
        calls.append(1)
        raise client_error("AccessDenied", 403)

    with pytest.raises(ClientError):
        retry_transient(denied, sleep=lambda s: None)
    assert len(calls) == 1


def test_retries_give_up_with_a_transient_store_error():
    with pytest.raises(StoreUnavailable, match="failed 3 times .*SlowDown") as caught:
        retry_transient(
            lambda: (_ for _ in ()).throw(client_error("SlowDown", 503)),
            policy=RetryPolicy(attempts=3),
            sleep=lambda s: None,
            what="read x",
        )
    assert caught.value.transient and is_transient_store_error(caught.value)


def test_store_reads_survive_transient_s3_failures(s3_uri, monkeypatch):
    store = Store.open(s3_uri)
    with store.begin("s", "k", config={}) as writer:
        writer.write_bytes("blob", b"payload")
        manifest = writer.commit()
    real = store.fs.cat_file
    failures = [client_error("ServiceUnavailable", 503), ConnectionResetError(errno.ECONNRESET, "reset")]
    monkeypatch.setattr("infra.errors.time.sleep", lambda s: None)

    def flaky(path, *args, **kwargs):
        if failures:
            raise failures.pop(0)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(store.fs, "cat_file", flaky)
    assert store.read_bytes(manifest, "blob") == b"payload"
    assert failures == []

    def forbidden(path, *args, **kwargs):
        error = PermissionError("denied")
        error.__cause__ = client_error("AccessDenied", 403)
        raise error

    monkeypatch.setattr(store.fs, "cat_file", forbidden)
    with pytest.raises(AccessDenied, match="access denied to s3://"):
        store.read_bytes(manifest, "blob")


@pytest.mark.timeout(120)
def test_a_put_on_a_connection_that_never_answers_times_out_as_transient():
    """aiobotocore sends PUTs with "Expect: 100-continue" and waits for the 100 with no read timeout:
    a server (or a network) that accepts and never answers hung a stage for good (S3 outage drill)."""
    import dataclasses
    import socket
    import threading
    import time

    from infra.errors import RetryPolicy, StoreUnavailable
    from infra.s3 import S3Backend, resolve_settings

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def swallow() -> None:  # accept, read whatever comes, never answer
        while True:
            conn, _ = server.accept()
            threading.Thread(
                target=lambda c=conn: [None for _ in iter(lambda: c.recv(65536), b"")], daemon=True
            ).start()

    threading.Thread(target=swallow, daemon=True).start()
    settings = resolve_settings(
        "s3://bucket/store",
        endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}",
        access_key_id="id",
        secret_access_key="secret",
        env={},
    )
    settings = dataclasses.replace(
        settings,
        read_timeout_s=2.0,
        operation_timeout_s=2.0,
        retry=RetryPolicy(attempts=2, base_delay_s=0.01, max_delay_s=0.01),
    )
    backend = S3Backend(settings)
    for what, call in [
        ("write", lambda: backend.write_bytes("bucket/store/x", b"x" * 100)),
        ("create", lambda: backend._put_if_absent("bucket/store/y", b"y", "create")),
        ("read", lambda: backend.read_bytes("bucket/store/x")),
    ]:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert time.monotonic() - started < 20, what
        assert is_transient_store_error(caught.value) and "failed 2 times" in str(caught.value), what
    server.close()
