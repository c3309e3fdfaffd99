"""The Serve deployment (batching, hot swap) and the application builder every launcher shares.

    fewstep serve --store URI                 (workers.serving.app.start, in the foreground)
    serve run workers.serving.app:build store=s3://bucket/fewstep
    serve deploy config.yaml                  (import_path: workers.serving.app:build, args: {...})
    KubeRay RayService serveConfigV2          (the same import path and args)

all start the same app from typed :class:`AppArgs`. A replica opens the store from its URI
with the credentials of its own environment: nothing secret is pickled into Serve's
controller.

Accepted requests meet in one ``@serve.batch`` queue; a batch is split into groups that
share (steps, sampler, guidance) and each group is one :meth:`Generator.generate_many` call,
i.e. one forward pass per sampling step. Image ``i`` of a request is drawn from the seed
``(seed, i)``, so a seeded request gets the same images alone or in a batch (up to the last
bit of float arithmetic: a batched matmul may round differently, which moves a pixel by at
most one level).

A batch is capped by the work it holds, not by its request count alone, and waits for company
only as long as company is coming (:func:`~workers.serving.replica.batch_cost`). What a replica
does with a request, apart from the queue, is :class:`~workers.serving.replica.Replica`, which a
plain uvicorn server can run too (``benchmarks/plain_server.py``).

Hot swap: unless the app is pinned to a ``model`` (its ``user_config``), each replica reads
the ``serving/current`` pointer every ``poll_s`` seconds and, when it moved, loads the new
generator beside the old one (digests verified, a seeded sanity batch drawn) and swaps one
attribute. A batch holds the model it started with, so requests in flight finish on the old
model and none is dropped; the response's ``model`` names the one that drew it. A model that
fails to load or draws non-finite images leaves the old one serving, is retried only after a
back-off, and makes ``/healthz`` say ``degraded`` (:mod:`workers.serving.swap`).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict
from ray import serve

from infra.cards import GeneratorCard
from infra.config import ServeConfig
from infra.errors import NotCommitted
from infra.store import Manifest, Store
from workers.runtime import remote_options
from workers.serving.http import make_api
from workers.serving.replica import POINTER, Drawn, Replica, Ticket, batch_cost
from workers.serving.request import Limits
from workers.serving.swap import RETRY_S, load_served

APP_NAME = "fewstep"


@serve.deployment(name="FewstepGenerator")
@serve.ingress()
class FewstepGenerator(Replica):
    """A :class:`Replica` behind Serve: its batch queue is ``@serve.batch``, its routes :func:`make_api`."""

    def __init__(
        self,
        store_uri: str,
        limits: Limits,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        poll_s: float,
        pointer: str = POINTER,
        retry_s: float = RETRY_S,
        max_batch_images_steps: int | None = None,
    ):
        super().__init__(store_uri, limits, max_batch_size, poll_s, pointer, retry_s, max_batch_images_steps)
        self.draw.set_max_batch_size(max_batch_size)  # the budget, in the units of BatchFill.cost
        self.draw.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self, self.limits.max_body_bytes)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def draw(self, tickets: list[Ticket]) -> list[Drawn | Exception]:
        return await self.draw_batch(tickets)


# --------------------------------------------------------------------------- building and running


def deployment_options(config: ServeConfig, model: str | None, max_batch_size: int) -> dict[str, Any]:
    """Serve's deployment options from the config: replicas or autoscaling, resources, queue limits."""
    resources = config.resources
    scaling: dict[str, Any] = {"num_replicas": resources.workers}
    if config.max_replicas is not None:
        scaling = {
            "num_replicas": "auto",
            "autoscaling_config": {
                "min_replicas": resources.workers,
                "max_replicas": config.max_replicas,
                "target_ongoing_requests": config.target_ongoing_requests,
            },
        }
    return {
        **scaling,
        "ray_actor_options": remote_options(resources),
        "max_ongoing_requests": max(config.max_ongoing_requests, max_batch_size),
        "max_queued_requests": config.max_queued_requests,
        "max_constructor_retry_count": 3,  # a model that fails to load fails the deploy, not 20 retries later
        "user_config": {"model": model},
    }


def build_app(
    store_uri: str,
    config: ServeConfig,
    model: str | None = None,
    *,
    max_batch_size: int | None = None,
    access_log: bool = True,
) -> serve.Application:
    """The deployment, sized from ``config``; ``model`` pins a ref, else the app follows the pointer.
    ``max_batch_size`` overrides the config's (1 turns batching off, for benchmarks); ``access_log``
    False stops the replica's line per request."""
    batch = config.max_batch_size if max_batch_size is None else max_batch_size
    options = deployment_options(config, model, batch)
    if not access_log:
        options["logging_config"] = {"enable_access_log": False}
    deployment = FewstepGenerator.options(**options)
    return deployment.bind(
        str(store_uri),
        Limits.from_config(config),
        batch,
        config.batch_wait_timeout_s,
        config.poll_s,
        POINTER,
        retry_s=config.swap_retry_s,
        max_batch_images_steps=config.max_batch_images_steps,
    )


class AppArgs(BaseModel):
    """The typed arguments of :func:`build` (``serve run ... key=value``, or ``args:`` in a Serve config)."""

    model_config = ConfigDict(extra="forbid")

    store: str = "./fewstep-store"  # a folder or s3://bucket/prefix; S3 settings from the environment
    model: str | None = None  # serve this ref (stage/key) and ignore promotions
    serve: ServeConfig = ServeConfig()  # the serve section of a fewstep config


def build(args: dict[str, Any]) -> serve.Application:
    """The application builder: ``import_path: workers.serving.app:build``."""
    parsed = AppArgs.model_validate(args)
    return build_app(parsed.store, parsed.serve, parsed.model)


def resolve_model(store: Store, model: str | None) -> Manifest:
    """The manifest to serve: ``model`` if given, else what ``serving/current`` points at."""
    ref = model or store.get_pointer(POINTER)
    if ref is None:
        raise NotCommitted(
            f"no model is promoted in {store.uri} (pointer {POINTER!r} is unset): "
            "run `fewstep run` first, or pass --model REF (`fewstep status` lists refs)"
        )
    manifest = store.get_ref(ref)
    if not GeneratorCard.is_generator(manifest):
        raise NotCommitted(
            f"{ref} is a {manifest.stage!r} output, not a generator; serve a base, reflow or consistency ref"
        )
    GeneratorCard.from_manifest(manifest)
    return manifest


def check_servable(store: Store, ref: str, config: ServeConfig) -> None:
    """Load ``ref`` here, in the driver, as a replica would and draw its sanity batch: a corrupt or
    non-finite model fails in seconds with :class:`IntegrityError` / :class:`UnfitModel`, not after
    Serve has retried its replicas."""
    load_served(store, ref, config.solver, config.steps)


def start(
    store_uri: str,
    config: ServeConfig,
    model: str | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    name: str = APP_NAME,
    max_batch_size: int | None = None,
    access_log: bool = True,
) -> str:
    """Start Serve's HTTP proxy on host:port (Ray must be up) and deploy the app; returns its URL.

    ``access_log`` False stops the proxy's and the replica's line per request."""
    host = config.host if host is None else host
    port = config.port if port is None else port
    serve.start(
        http_options={"host": host, "port": port}, logging_config=None if access_log else {"enable_access_log": False}
    )
    app = build_app(store_uri, config, model, max_batch_size=max_batch_size, access_log=access_log)
    serve.run(app, name=name, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Tear down every Serve app and the proxy (Ray itself stays up)."""
    serve.shutdown()
