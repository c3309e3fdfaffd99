"""Starting or attaching to Ray, once per driver process."""

from __future__ import annotations

import logging
import os

import ray

from infra.config import Resources

log = logging.getLogger("fewstep.ray")

_started_address: dict[str, str] = {}  # the local cluster this process started, if any


def ensure_ray(address: str | None = None, num_cpus: int | None = None, verbose: bool = True) -> None:
    """Attach to ``address`` (or ``RAY_ADDRESS``), else start a local Ray; no-op when already up.

    ``verbose=False`` keeps the workers' logs and Ray's own INFO lines off the driver's console
    (the command line's progress view shows what matters).

    A local Ray gets at least 4 logical CPUs even on a 2-core machine: Ray's CPUs are a
    scheduling unit, and a Ray Train worker plus the Ray Data actors that feed it must be
    able to coexist without deadlocking on a small box.
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("attaching to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=verbose, logging_level=logging.INFO if verbose else logging.WARNING)
        return
    cpus = num_cpus if num_cpus is not None else max(4, os.cpu_count() or 1)
    log.info("starting a local Ray with %d logical CPUs", cpus)
    if not verbose:  # Ray warns that it enabled token authentication, its default for local clusters
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=verbose,
             logging_level=logging.INFO if verbose else logging.WARNING)
    if not verbose:  # Ray Data configures its own logger when imported: quiet it afterwards
        import ray.data as ray_data  # noqa: F401

        logging.getLogger("ray.data").setLevel(logging.ERROR)
    # Processes Ray Train starts on its own (e.g. its placement-group cleaner) find this
    # cluster by RAY_ADDRESS, not by guessing among other Ray instances on the machine.
    os.environ["RAY_ADDRESS"] = _started_address["address"] = ray.get_runtime_context().gcs_address


def shutdown_ray() -> None:
    """Disconnect from (or stop) the Ray this process started or attached to."""
    if ray.is_initialized():
        ray.shutdown()
    if os.environ.get("RAY_ADDRESS") == _started_address.get("address"):
        os.environ.pop("RAY_ADDRESS", None)  # it named the cluster we just stopped


def current_node() -> str:
    """The Ray node id this code runs on ("local" outside Ray)."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"


def remote_options(resources: Resources) -> dict:
    """Ray's options for one task or actor of a stage: ``num_cpus``, ``num_gpus`` and its custom resources.

    The same keys serve ``.options(...)``, Ray Data's ``map_batches`` and Serve's ``ray_actor_options``."""
    options: dict = {"num_cpus": resources.cpus, "num_gpus": resources.gpus or None}
    if resources.custom:
        options["resources"] = dict(resources.custom)
    return options


def worker_resources(resources: Resources) -> dict[str, float]:
    """One Ray Train worker's bundle (``ScalingConfig.resources_per_worker``)."""
    return {"CPU": resources.cpus, **({"GPU": resources.gpus} if resources.gpus > 0 else {}), **resources.custom}
