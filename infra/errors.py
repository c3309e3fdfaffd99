"""What can go wrong with the artifact store, said so a user can act on it; and the one retry policy.

Every error the store raises is a :class:`StoreError`. Each subclass names the value that
was wrong and what to do about it, so the CLI can print ``str(error)`` as one line.

Transient failures (5xx answers but 501, throttling, timeouts, reset or refused connections) are
retried by :func:`retry_transient` with exponential backoff; permanent ones (a missing
bucket, rejected credentials, a 4xx answer, 501 Not Implemented, a missing file) are raised at once. The S3
clients underneath are built with their own retries switched off, so this is the only
retry layer and its behaviour is the one documented here.
"""

from __future__ import annotations

import errno
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """Base of every artifact-store error. ``transient`` says whether a later retry may succeed."""

    transient = False


class InvalidStoreURI(StoreError):
    """A store URI that cannot be parsed (e.g. ``s3://`` without a bucket)."""


class UnknownScheme(InvalidStoreURI):
    """A store URI whose scheme is neither a local path, ``file://`` nor ``s3://``."""


class BucketNotFound(StoreError):
    """The bucket of an ``s3://`` store does not exist at the endpoint."""


class AccessDenied(StoreError):
    """The endpoint rejected the credentials, or they lack permission on the bucket."""


class EndpointUnreachable(StoreError):
    """Nothing answered at the S3 endpoint when the store was opened."""


class StoreUnavailable(StoreError):
    """An operation kept failing with transient errors after every retry."""

    transient = True


class NotCommitted(StoreError):
    """A ref (``stage/key``) or file that has no committed manifest: it does not exist."""


class IntegrityError(StoreError):
    """Stored bytes differ from what their manifest recorded (corrupt, truncated, or missing)."""


class InvalidName(StoreError):
    """A stage, key, file or pointer name that is not a safe relative path."""


class UnsupportedServer(StoreError):
    """The S3 server lacks something the store relies on: it answered 501 Not Implemented, or it
    ignores a conditional write (``If-None-Match: *``) and would let two writers replace each other."""


class PointerMoved(StoreError):
    """A compare-and-swap pointer move found the pointer elsewhere than the caller expected."""


class NoPreviousChampion(StoreError):
    """A rollback with no earlier champion in the pointer's history to put back."""


class WarmStartError(StoreError):
    """A warm start (``retrain.mode: warm``) whose parent in the served lineage cannot be loaded."""


class GcRefused(StoreError):
    """``fewstep gc`` was asked to do something unsafe (e.g. a minimum age below the floor)."""


# ---------------------------------------------------------------------------------------
# Transient or permanent


# S3 error codes that mean "try again later" even when the HTTP status is 4xx.
TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "ServiceUnavailable",
        "ConditionalRequestConflict",
        "OperationAborted",
    }
)
# errno values of network failures; EBUSY and EREMOTEIO are what s3fs makes of 503/409 and 500.
TRANSIENT_ERRNOS = frozenset(
    {
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.ETIMEDOUT,
        errno.EPIPE,
        errno.EBUSY,
        errno.EREMOTEIO,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.EAGAIN,
    }
)
# pyarrow's S3 filesystem (what Ray Data reads and writes through) raises plain OSErrors without
# an errno; these words in the message mark the transient ones (the list Ray Data retries on).
TRANSIENT_MESSAGES = (
    "AWS Error NETWORK_CONNECTION",
    "AWS Error SLOW_DOWN",
    "AWS Error SERVICE_UNAVAILABLE",
    "AWS Error INTERNAL_FAILURE",
    "AWS Error UNKNOWN (HTTP status 503)",
)
# botocore / aiohttp exception class names that are network trouble, matched by name so this
# module imports neither (a whole class hierarchy, e.g. EndpointConnectionError, is covered by
# checking every class in the exception's MRO).
TRANSIENT_CLASS_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "HTTPClientError",
        "IncompleteReadError",
        "ResponseStreamingError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ClientConnectionError",
        "ClientOSError",
        "ServerTimeoutError",
        "ProtocolError",
        "IncompleteRead",
        "FSTimeoutError",
    }
)


def _client_error_is_transient(error: BaseException) -> bool | None:
    """For a botocore ClientError: transient or not; None when ``error`` is not one."""
    response = getattr(error, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str(response["Error"].get("Code", ""))
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or (int(code) if code.isdigit() else 0)
    if code == "NotImplemented" or status == 501:
        return False  # the server will never do it: asking again only delays the real error
    return code in TRANSIENT_CODES or status == 429 or status >= 500


def _one_is_transient(error: BaseException) -> bool | None:
    """True/False when this exception alone decides; None when its cause should be looked at."""
    if isinstance(error, StoreError):
        return error.transient
    verdict = _client_error_is_transient(error)
    if verdict is not None:
        return verdict
    if any(cls.__name__ in TRANSIENT_CLASS_NAMES for cls in type(error).__mro__):
        return True
    if isinstance(error, (socket.timeout, TimeoutError, ConnectionError)):
        return True
    if isinstance(error, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
        return False
    if isinstance(error, OSError) and error.errno in TRANSIENT_ERRNOS:
        return True
    if isinstance(error, OSError) and any(marker in str(error) for marker in TRANSIENT_MESSAGES):
        return True
    return None


def is_transient_store_error(error: BaseException) -> bool:
    """True when retrying the operation that raised ``error`` may succeed.

    Looks through ``__cause__``/``__context__`` (s3fs wraps botocore errors in OSErrors).
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        verdict = _one_is_transient(current)
        if verdict is not None:
            return verdict
        current = current.__cause__ or current.__context__
    return False


is_transient = is_transient_store_error


@dataclass(frozen=True)
class RetryPolicy:
    """``attempts`` tries in all; the wait before try k+1 is ``min(max_delay_s, base_delay_s * 2**k)``
    times a random factor in [0.5, 1] (jitter, so concurrent writers do not retry in step)."""

    attempts: int = 5
    base_delay_s: float = 0.2
    max_delay_s: float = 5.0

    def delay(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)


DEFAULT_RETRY = RetryPolicy()


def retry_transient(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy = DEFAULT_RETRY,
    what: str = "store operation",
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn()``; on a transient error wait and call again, up to ``policy.attempts`` times.

    Permanent errors propagate unchanged on the first try. When every try failed
    transiently, raises :class:`StoreUnavailable` (``transient=True``) from the last error.
    """
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - classified just below
            if not is_transient_store_error(error):
                raise
            if attempt + 1 == policy.attempts:
                raise StoreUnavailable(
                    f"{what} failed {policy.attempts} times with transient errors (last: {describe(error)}); "
                    "check that the S3 endpoint is up and not throttling, then retry"
                ) from error
            (sleep or time.sleep)(policy.delay(attempt))
    raise AssertionError("unreachable")  # pragma: no cover


def describe(error: BaseException) -> str:
    """``ClassName: message`` of an error, with the S3 error code when there is one."""
    response = getattr(error, "response", None)
    if isinstance(response, dict) and "Error" in response:
        return f"{type(error).__name__} {response['Error'].get('Code')}: {response['Error'].get('Message', '')}".strip()
    text = str(error).strip() or repr(error)
    return f"{type(error).__name__}: {text}"
