"""The S3 side of the store: settings from the standard AWS variables, the backend, clear errors.

Any S3-compatible server works (AWS, MinIO, moto, ...). Settings come from explicit options
first, then the environment:

| setting     | environment                                        | default     |
|-------------|----------------------------------------------------|-------------|
| endpoint    | AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL         | AWS         |
| region      | AWS_REGION, then AWS_DEFAULT_REGION                | us-east-1   |
| credentials | AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN | the AWS default chain |

Both filesystems get them explicitly (pyarrow's S3 filesystem does not read the endpoint
variables itself). The s3fs client used by the store has its own retries off; every store
operation goes through :func:`infra.errors.retry_transient` instead. The pyarrow filesystem
handed to Ray Data keeps pyarrow's standard retry strategy, since those reads bypass the store.

Conditional writes. Manifests are published with ``PUT`` + ``If-None-Match: *``; some
S3-compatible servers ignore that header and let a second writer replace a committed manifest.
Before the first exclusive create a process makes on an endpoint+bucket (and when a store is
opened), :meth:`S3Backend.prove_conditional_create` creates one probe key twice: the second
create must be refused. A server that accepts it is refused with :class:`UnsupportedServer`;
the proof is cached per endpoint+bucket for the life of the process. A 412 answer is "the
object exists" whether or not the server names the failed ``<Condition>``. Pointer moves use
``If-Match`` with the ETag read (not probed: on a server that ignores it a move is a
read-compare-write, a best effort).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import IO, Any, TypeVar
from urllib.parse import urlparse

from infra.backends import Backend, FileInfo
from infra.errors import (
    DEFAULT_RETRY,
    AccessDenied,
    BucketNotFound,
    EndpointUnreachable,
    InvalidStoreURI,
    RetryPolicy,
    StoreError,
    StoreUnavailable,
    UnsupportedServer,
    retry_transient,
)

T = TypeVar("T")

DEFAULT_REGION = "us-east-1"
CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidClientTokenId",
        "AuthorizationHeaderMalformed",
    }
)
DENIED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "403", "Forbidden"})
OPERATION_MIN_MIB_S = 1.0  # the slowest upload an operation's deadline allows for
# Opening a store fails fast: a typo in the endpoint should not wait through a long backoff.
OPEN_RETRY = RetryPolicy(attempts=3, base_delay_s=0.1, max_delay_s=0.5)
PROBE_FOLDER = ".fewstep-probe"  # under the store root; each probe key is removed right after
# (endpoint, bucket) pairs whose server refused a second exclusive create: proven for this process.
_CONDITIONAL_CREATE_PROVEN: set[tuple[str, str]] = set()
_PROVING = threading.Lock()


@dataclass(frozen=True)
class S3Settings:
    """Everything needed to reach one ``s3://bucket/prefix`` store."""

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str = DEFAULT_REGION
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    # Every store operation's deadline, plus 1 s per MiB it sends (OPERATION_MIN_MIB_S): the read
    # timeout does not cover a PUT waiting for "100 Continue" (aiobotocore sends every PUT with
    # "Expect: 100-continue"), so a PUT on a connection the network dropped would wait forever.
    operation_timeout_s: float = 120.0
    retry: RetryPolicy = DEFAULT_RETRY

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    @property
    def where(self) -> str:
        """The endpoint in words, for error messages."""
        return self.endpoint_url or f"AWS S3 ({self.region})"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ("bucket", "some/prefix")."""
    parsed = urlparse(uri)
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    if not bucket:
        raise InvalidStoreURI(f"store URI {uri!r} names no bucket; write it as s3://BUCKET or s3://BUCKET/PREFIX")
    if parsed.query or parsed.fragment:
        raise InvalidStoreURI(f"store URI {uri!r} has a query or fragment; write it as s3://BUCKET/PREFIX")
    return bucket, prefix


def resolve_settings(
    uri: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_id: str | None = None,
    secret_access_key: str | None = None,
    session_token: str | None = None,
    env: dict[str, str] | None = None,
) -> S3Settings:
    """Explicit options first, then the standard AWS variables (see the module docstring)."""
    env = dict(os.environ) if env is None else env
    bucket, prefix = parse_s3_uri(uri)
    endpoint = endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
    if endpoint is not None and urlparse(endpoint).scheme not in ("http", "https"):
        raise InvalidStoreURI(
            f"S3 endpoint {endpoint!r} is not an http(s) URL; set AWS_ENDPOINT_URL or --endpoint-url "
            "to something like http://127.0.0.1:9000"
        )
    explicit_keys = access_key_id is not None or secret_access_key is not None
    return S3Settings(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        access_key_id=access_key_id if explicit_keys else env.get("AWS_ACCESS_KEY_ID"),
        secret_access_key=secret_access_key if explicit_keys else env.get("AWS_SECRET_ACCESS_KEY"),
        session_token=session_token if explicit_keys else env.get("AWS_SESSION_TOKEN"),
    )


def client_error_response(error: BaseException) -> dict | None:
    """The response of the first botocore ClientError in ``error``'s cause chain (None: there is none)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict) and "Error" in response:
            return response
        current = current.__cause__ or current.__context__
    return None


def client_error_code(error: BaseException) -> str | None:
    """The S3 error code of the first botocore ClientError in ``error``'s cause chain."""
    response = client_error_response(error)
    return None if response is None else str(response["Error"].get("Code", ""))


def client_error_status(error: BaseException) -> int | None:
    """The HTTP status of the first botocore ClientError in ``error``'s cause chain."""
    response = client_error_response(error)
    return None if response is None else response.get("ResponseMetadata", {}).get("HTTPStatusCode")


def precondition_failed(error: BaseException) -> bool:
    """A 412: the object exists (If-None-Match) or changed (If-Match). s3fs turns it into
    FileExistsError only when the server names the ``<Condition>``; otherwise into OSError(EINVAL)."""
    if isinstance(error, FileExistsError):
        return True
    return client_error_code(error) in ("PreconditionFailed", "412") or client_error_status(error) == 412


def _has_class(error: BaseException, *names: str) -> bool:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if any(cls.__name__ in names for cls in type(current).__mro__):
            return True
        current = current.__cause__ or current.__context__
    return False


def translate(error: BaseException, settings: S3Settings, what: str) -> BaseException:
    """The StoreError a user can act on for an S3 failure; other errors are returned unchanged."""
    if isinstance(error, StoreError) and not isinstance(error, StoreUnavailable):
        return error
    code = client_error_code(error)
    # Never the key id itself: error lines end up in logs, Prefect artifacts and bug reports.
    keys = (
        "the configured access key, from AWS_ACCESS_KEY_ID or the store options"
        if settings.access_key_id
        else "the default AWS credential chain"
    )
    if code == "NotImplemented" or client_error_status(error) == 501:
        return UnsupportedServer(
            f"the S3 server at {settings.where} does not implement the operation needed to {what} "
            "(501 Not Implemented); retrying will not help: use a server that supports it "
            "(AWS S3, or a current MinIO)"
        )
    if code == "NoSuchBucket":
        return BucketNotFound(
            f"bucket {settings.bucket!r} does not exist at {settings.where}; create it "
            f"(e.g. `aws s3 mb s3://{settings.bucket}`) or fix the --store URI"
        )
    if _has_class(error, "NoCredentialsError", "PartialCredentialsError"):
        return AccessDenied(
            f"found no S3 credentials to {what} at {settings.where}; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or use an AWS profile or instance role)"
        )
    if code in CREDENTIAL_CODES:
        return AccessDenied(
            f"{settings.where} rejected the credentials ({keys}) while trying to {what} [{code}]; "
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY to valid keys for this endpoint"
        )
    if code in DENIED_CODES or (code is None and isinstance(error, PermissionError)):
        return AccessDenied(
            f"access denied to {settings.uri} at {settings.where} while trying to {what} ({keys}); "
            "check the credentials and that their policy allows s3:ListBucket, GetObject, PutObject, DeleteObject"
        )
    if code == "InvalidBucketName" or _has_class(error, "ParamValidationError"):
        return InvalidStoreURI(
            f"bucket name {settings.bucket!r} in {settings.uri!r} is not valid (S3 bucket names are 3-63 "
            "lowercase letters, digits, dots and hyphens); fix the --store URI"
        )
    return error


class S3Backend(Backend):
    """The store's file operations on ``s3://bucket/prefix`` (paths are ``bucket/prefix/...``)."""

    def __init__(self, settings: S3Settings):
        self.settings = settings
        self.root = f"{settings.bucket}/{settings.prefix}".rstrip("/")
        self.uri = settings.uri

    def __reduce__(self):
        return (S3Backend, (self.settings,))

    # -- filesystems ----------------------------------------------------------------------

    @cached_property
    def fs(self):
        import s3fs

        s = self.settings
        config: dict[str, Any] = {
            "connect_timeout": s.connect_timeout_s,
            "read_timeout": s.read_timeout_s,
            "retries": {"total_max_attempts": 1, "mode": "standard"},  # retry_transient retries
        }
        if s.endpoint_url:
            config["s3"] = {"addressing_style": "path"}  # what MinIO and moto expect
        fs = s3fs.S3FileSystem(
            key=s.access_key_id,
            secret=s.secret_access_key,
            token=s.session_token,
            endpoint_url=s.endpoint_url,
            client_kwargs={"region_name": s.region},
            config_kwargs=config,
            skip_instance_cache=True,
            use_listings_cache=False,
        )
        fs.retries = 1
        return fs

    @cached_property
    def pa_filesystem(self):
        import pyarrow.fs

        s = self.settings
        options: dict[str, Any] = {
            "access_key": s.access_key_id,
            "secret_key": s.secret_access_key,
            "session_token": s.session_token,
            "region": s.region,
            "connect_timeout": s.connect_timeout_s,
            "request_timeout": s.read_timeout_s,
        }
        if s.endpoint_url:
            parsed = urlparse(s.endpoint_url)
            options["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
            options["scheme"] = parsed.scheme
        if not s.access_key_id:  # let pyarrow use the default AWS chain
            for name in ("access_key", "secret_key", "session_token"):
                options.pop(name)
        return pyarrow.fs.S3FileSystem(**options)

    # -- calls ------------------------------------------------------------------------------

    def deadline(self, nbytes: int = 0) -> float:
        """Seconds one operation may take (fsspec raises FSTimeoutError, a transient error, after it)."""
        return self.settings.operation_timeout_s + nbytes / (OPERATION_MIN_MIB_S * 2**20)

    def call(self, what: str, fn: Callable[[], T], policy: RetryPolicy | None = None) -> T:
        """``fn()`` with transient retries; failures become StoreErrors that say what to do."""
        try:
            return retry_transient(fn, policy=policy or self.settings.retry, what=f"{what} at {self.settings.where}")
        except FileNotFoundError as error:
            if client_error_code(error) == "NoSuchBucket":
                raise translate(error, self.settings, what) from None
            raise
        except Exception as error:  # noqa: BLE001 - translated or re-raised as is
            translated = translate(error, self.settings, what)
            if translated is error:
                raise
            raise translated from None

    def probe(self) -> None:
        """One cheap listing, so a wrong bucket, key or endpoint is reported when the store opens."""
        s = self.settings
        prefix = f"{s.prefix}/" if s.prefix else ""
        try:
            self.call(
                "list the bucket",
                lambda: self.fs.call_s3(
                    "list_objects_v2", Bucket=s.bucket, Prefix=prefix, MaxKeys=1, timeout=self.deadline()
                ),
                policy=OPEN_RETRY,
            )
        except StoreUnavailable as error:
            raise EndpointUnreachable(
                f"no S3 endpoint answered at {s.where} ({type(error.__cause__ or error).__name__}); "
                "check AWS_ENDPOINT_URL (or --endpoint-url) and that the server is running"
            ) from None

    def prove_conditional_create(self) -> None:
        """Refuse a server that ignores ``If-None-Match: *`` (see the module docstring): create one
        probe key twice; the second create must fail and leave the first bytes. Cached per
        endpoint+bucket for this process. Read-only credentials cannot prove anything, and cannot
        commit either: the proof is then left to the first write."""
        s = self.settings
        proven_key = (s.endpoint_url or f"aws:{s.region}", s.bucket)
        if proven_key in _CONDITIONAL_CREATE_PROVEN:
            return
        with _PROVING:
            if proven_key in _CONDITIONAL_CREATE_PROVEN:
                return
            probe = self.join(PROBE_FOLDER, f"create-{uuid.uuid4().hex}")
            what = "check that the server honours conditional writes (PUT with If-None-Match: *)"
            try:
                first = self._put_if_absent(probe, b"first", what)
            except UnsupportedServer:
                raise UnsupportedServer(
                    f"the S3 server at {s.where} does not implement conditional writes (PUT with "
                    "If-None-Match: *, answered 501 Not Implemented); fewstep needs them so two writers of one "
                    "stage cannot replace each other's manifest: use AWS S3 or a server that supports them"
                ) from None
            try:
                second = self._put_if_absent(probe, b"second", what)
                kept = self.read_bytes(probe)
            finally:
                self.remove(probe)
            if not first or second or kept != b"first":
                raise UnsupportedServer(
                    f"the S3 server at {s.where} ignores If-None-Match: a second exclusive create of "
                    f"s3://{probe} succeeded and replaced the first, so a second writer could silently replace a "
                    "committed manifest; fewstep refuses this server: use AWS S3 or one that honours conditional writes"
                )
            _CONDITIONAL_CREATE_PROVEN.add(proven_key)

    def _put_if_absent(self, path: str, data: bytes, what: str) -> bool:
        try:
            self.call(what, lambda: self.fs.pipe_file(path, data, mode="create", timeout=self.deadline(len(data))))
            return True
        except OSError as error:
            if precondition_failed(error):  # the object exists, with or without a named <Condition>
                return False
            raise

    def read_bytes(self, path: str) -> bytes:
        return self.call(f"read s3://{path}", lambda: self.fs.cat_file(path, timeout=self.deadline()))

    def open_read(self, path: str) -> IO[bytes]:
        return self.call(f"open s3://{path}", lambda: self.fs.open(path, "rb", block_size=8 * 2**20))

    def hash_file(self, path: str) -> tuple[int, str]:
        # The whole stream is retried: a connection reset mid-file restarts the hash.
        return self.call(f"read s3://{path}", lambda: Backend.hash_file(self, path))

    def write_bytes(self, path: str, data: bytes) -> None:
        self.call(f"write s3://{path}", lambda: self.fs.pipe_file(path, data, timeout=self.deadline(len(data))))

    def copy(self, source: str, target: str) -> None:
        # CopyObject (multipart copy above 5 GiB): the bytes stay on the server.
        self.call(f"copy s3://{source}", lambda: self.fs.copy(source, target))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        # PUT with If-None-Match: * : the server refuses (412) when the object exists; a PUT is
        # atomic, so readers see the whole manifest or none. Only on a server proven to honour it.
        self.prove_conditional_create()
        return self._put_if_absent(path, data, f"create s3://{path}")

    def replace(self, path: str, data: bytes) -> None:
        self.write_bytes(path, data)  # a single PUT replaces an object atomically

    def compare_and_swap(self, path: str, data: bytes, matches: Callable[[bytes | None], bool]) -> bool:
        # Read the object with its ETag; PUT only if the ETag is still the one read (If-Match), or
        # if there is still no object (If-None-Match: *). A 412, or an object gone: someone moved it.
        bucket, key, _ = self.fs.split_path(path)
        try:
            current, etag = self.call(f"read s3://{path}", lambda: self._get_with_etag(bucket, key))
            condition = {"IfMatch": etag}
        except FileNotFoundError:
            current, condition = None, {"IfNoneMatch": "*"}
            self.prove_conditional_create()
        if not matches(current):
            return False
        try:
            self.call(
                f"replace s3://{path}",
                lambda: self.fs.call_s3(
                    "put_object", Bucket=bucket, Key=key, Body=data, **condition, timeout=self.deadline(len(data))
                ),
            )
        except OSError as error:
            if isinstance(error, FileNotFoundError) or precondition_failed(error):
                return False
            raise
        return True

    def _get_with_etag(self, bucket: str, key: str) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        async def get() -> tuple[bytes, str]:
            response = await self.fs._call_s3("get_object", Bucket=bucket, Key=key)
            try:
                return await response["Body"].read(), response["ETag"]
            finally:
                response["Body"].close()

        return sync(self.fs.loop, get, timeout=self.deadline())

    def list_info(self, path: str) -> dict[str, FileInfo]:
        found = self.call(f"list s3://{path}", lambda: self.fs.find(path, detail=True, timeout=self.deadline()))
        base = path.rstrip("/") + "/"
        # Skip folder markers (empty "dir/" keys some writers, e.g. pyarrow's create_dir, leave).
        return {
            full[len(base) :]: FileInfo(int(info.get("size") or 0), _modified(info))
            for full, info in found.items()
            if info.get("type") != "directory" and full.startswith(base) and not full.endswith("/")
        }

    def list_dirs(self, path: str) -> list[str]:
        try:
            entries = self.call(f"list s3://{path}", lambda: self.fs.ls(path, detail=True, timeout=self.deadline()))
        except FileNotFoundError:
            return []
        return sorted(
            entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in entries if entry.get("type") == "directory"
        )

    def remove(self, path: str) -> None:
        try:
            self.call(f"remove s3://{path}", lambda: self.fs.rm(path, recursive=True, timeout=self.deadline()))
        except FileNotFoundError:
            pass


def _modified(info: dict[str, Any]) -> float:
    """LastModified of an s3fs listing entry as epoch seconds (the server's clock)."""
    when = info.get("LastModified") or info.get("last_modified")
    if when is None:
        return float("inf")  # unknown: "just now", so gc never takes it for old
    return when.timestamp() if hasattr(when, "timestamp") else float(when)
