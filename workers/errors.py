"""Which failures are worth retrying: infrastructure hiccups yes, bad input never."""

from __future__ import annotations

import ray.exceptions

# A lost actor, worker or node: the cluster lost something, the input was fine.
RAY_TRANSIENT = (
    ray.exceptions.RayActorError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.ObjectLostError,
    ray.exceptions.OwnerDiedError,
    ray.exceptions.LocalRayletDiedError,
    ray.exceptions.RaySystemError,
)


def inner_errors(error: BaseException) -> list[BaseException]:
    """What a Ray Train failure carries instead of a ``__cause__``: each worker's exception
    (``WorkerGroupError.worker_failures``) or the controller's (``ControllerError``)."""
    failures = getattr(error, "worker_failures", None)
    inner = [e for e in failures.values() if isinstance(e, BaseException)] if isinstance(failures, dict) else []
    controller = getattr(error, "controller_failure", None)
    return inner + ([controller] if isinstance(controller, BaseException) else [])


def is_transient(error: BaseException) -> bool:
    """True for errors a retry can fix: lost Ray actors or nodes, transient store errors, and a
    Ray Train failure whose every worker failed with one of those."""
    from infra.errors import is_transient_store_error

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, RAY_TRANSIENT):
            return True
        if is_transient_store_error(error):
            return True
        if isinstance(error, ray.exceptions.RayTaskError):
            cause = error.as_instanceof_cause()
            if cause is not error and is_transient(cause):
                return True
        inner = inner_errors(error)
        if inner and all(is_transient(e) for e in inner):
            return True
        error = error.__cause__ or error.__context__
    return False


def transient_store_root(error: BaseException) -> BaseException | None:
    """The transient store error at the bottom of ``error`` (through Ray task wrappers, Ray
    Train worker failures and ``__cause__`` chains), or None when there is none or the store
    already said it as a :class:`~infra.errors.StoreError`."""
    from infra.errors import StoreError, is_transient_store_error

    seen: set[int] = set()
    pending = [error]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StoreError):
            return None  # already one line a user can act on
        if isinstance(current, ray.exceptions.RayTaskError):
            cause = current.as_instanceof_cause()
            pending.append(getattr(current, "cause", None))
            if cause is not current:
                pending.append(cause)
            continue
        if not isinstance(current, ray.exceptions.RayError) and is_transient_store_error(current):
            return current
        pending += inner_errors(current)
        pending.append(current.__cause__ or current.__context__)
    return None


def said_as_store_outage(stage: str, ref: str, error: BaseException) -> BaseException | None:
    """A one-line :class:`~infra.errors.StoreUnavailable` for a stage that a transient store
    error stopped deep inside Ray (a Ray Data read listing files while S3 was down, say),
    instead of the remote traceback; None when ``error`` is not that."""
    from infra.errors import StoreUnavailable

    root = transient_store_root(error)
    if root is None:
        return None
    detail = " ".join(str(root).split())[:240] or type(root).__name__
    return StoreUnavailable(
        f"{stage}: the artifact store failed while the stage ran ({type(root).__name__}: {detail}); "
        f"nothing of {ref} was committed and committed stages are kept - check that the S3 endpoint "
        "is up, then run again (committed stages are reused)"
    )
