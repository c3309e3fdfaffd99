"""Starting or attaching to Ray, once per driver process, and how many torch threads its workers run."""

from __future__ import annotations

import logging
import math
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
    # address="local": a cluster of our own, never one that `ray start` left on this machine
    ray.init(
        address="local",
        num_cpus=cpus,
        include_dashboard=False,
        log_to_driver=verbose,
        logging_level=logging.INFO if verbose else logging.WARNING,
    )
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


def machine_cores() -> int:
    """The cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_threads(cpus: float, workers: int, data_cores: int, local_cores: int | None) -> int:
    """Torch threads for each of ``workers`` Ray workers that hold ``cpus`` CPUs each.

        threads = max(floor(cpus), (local_cores - data_cores) // workers),  capped at local_cores

    ``local_cores`` is None on a cluster of several nodes (or one that is not this machine):
    a worker then runs exactly the CPUs it holds, as Ray's OMP_NUM_THREADS does. On a
    single-node cluster on this machine nothing else runs while a stage runs (stages run one
    at a time), so the stage's workers share the cores that Ray Data does not need meanwhile
    (``data_cores``: 0 when the data was read before the work starts, 1 when it streams
    alongside). That matters because a local Ray advertises more logical CPUs than the
    machine has cores (:func:`ensure_ray`): on 2 cores a lone worker holding 1 of 4 logical
    CPUs would otherwise run 1 thread and leave a core idle.
    """
    held = max(1, math.floor(cpus))
    if local_cores is None:
        return held
    shared = (local_cores - data_cores) // max(1, workers)
    return max(1, min(local_cores, max(held, shared)))


def local_node_cores() -> int | None:
    """This machine's usable cores when the Ray cluster is exactly one node on this machine, else None.

    Usable = min(the machine's cores, the CPUs the node advertises): a node started with
    ``--num-cpus 1`` on a big machine keeps its workers to one core.
    """
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) != 1 or nodes[0]["NodeID"] != ray.get_runtime_context().get_node_id():
        return None
    advertised = int(nodes[0].get("Resources", {}).get("CPU", 0))
    return max(1, min(machine_cores(), advertised or machine_cores()))


THREADS_ENV = "FEWSTEP_TORCH_THREADS"  # set: every stage worker runs exactly this many torch threads


def threads_for(cpus: float, workers: int, data_cores: int) -> int:
    """:func:`worker_threads` for the Ray cluster this driver is attached to (call on the driver).

    ``FEWSTEP_TORCH_THREADS`` overrides it, e.g. on a machine shared with other work, where
    threads that wait for each other at every parallel region lose more than they gain.
    """
    forced = os.environ.get(THREADS_ENV)
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"{THREADS_ENV}={forced!r} must be a positive integer (torch threads per worker)")
        return int(forced)
    return worker_threads(cpus, workers, data_cores, local_node_cores())


# What a multi-threaded worker's OpenMP threads do between ops, unless the driver's environment
# says otherwise: spin a little, then sleep (benchmarks/threads_bench.py, BENCHMARKS.md "Threads").
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
BOUNDED_SPIN = {"GOMP_SPINCOUNT": "1000"}


def worker_env(threads: int) -> dict[str, str]:
    """Environment for a worker process that runs ``threads`` torch threads.

    With several threads, libgomp's waiting threads spin ~1,000 times, not its default
    ~300,000, before they sleep (``GOMP_SPINCOUNT=1000``). Measured on 2 cores
    (``benchmarks/threads_bench.py``, two runs): alone, the bounded spin keeps 0.85-0.98x of
    the default's speed where sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) keeps 0.53-0.54x;
    with a second such worker on the same cores, the default spin collapses (each spins on the
    core the other needs) and the bounded spin runs 1.65-2.55x faster than it. ``OMP_WAIT_POLICY``
    or ``GOMP_SPINCOUNT`` set in the driver's environment wins.
    """
    if threads <= 1:
        return {}
    chosen = {name: os.environ[name] for name in WAIT_ENV if os.environ.get(name)}
    return chosen or dict(BOUNDED_SPIN)


def use_threads(threads: int | None) -> int:
    """In a Ray worker: run ``threads`` torch threads (None: keep Ray's OMP_NUM_THREADS); returns the count."""
    import torch

    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    return torch.get_num_threads()


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
