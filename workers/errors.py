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
