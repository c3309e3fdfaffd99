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

A batch is capped by the work it holds, not by its request count alone (:func:`batch_cost`):
at most ``max_batch_images_steps`` images x steps and at most ``max_batch_size`` requests. It
waits up to ``batch_wait_timeout_s`` for company, but only for as many requests as the last
batch held: a lone client is never kept waiting, and a steady crowd fills each batch without
sitting out the whole timeout.

Hot swap: unless the app is pinned to a ``model`` (its ``user_config``), each replica reads
the ``serving/current`` pointer every ``poll_s`` seconds and, when it moved, loads the new
generator beside the old one (digests verified, a seeded sanity batch drawn) and swaps one
attribute. A batch holds the model it started with, so requests in flight finish on the old
model and none is dropped; the response's ``model`` names the one that drew it. A model that
fails to load or draws non-finite images leaves the old one serving, is retried only after a
back-off, and makes ``/healthz`` say ``degraded`` (:mod:`workers.serving.swap`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict
from ray import serve

from infra.cards import GeneratorCard
from infra.config import ServeConfig
from infra.errors import NotCommitted
from infra.store import SERVING_POINTER, Manifest, Store
from workers.generator import Request
from workers.runtime import remote_options
from workers.serving.http import Generated, make_api
from workers.serving.request import MAX_SEED, GenerateBody, Limits, problem, problems
from workers.serving.swap import RETRY_S, Served, Watch, load_served

log = logging.getLogger("fewstep.serve")

POINTER = SERVING_POINTER
APP_NAME = "fewstep"


def log_to_stderr() -> None:
    """The replica's own log lines (swaps, failed swaps, store trouble) on its stderr, which Ray keeps
    in the worker's log file and forwards to a driver started with ``log_to_driver``."""
    if not log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s %(name)s -- %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


@dataclass(frozen=True)
class Drawn:
    """What one request got out of a batch."""

    served: Served
    sampler: str
    pixels: Any  # (n, H, W, C) uint8
    nfe: int
    seconds: float
    batch_requests: int  # requests that shared its forward passes


class BatchFill:
    """A replica's batch budget, and how many requests the last batch held (what the next one waits for)."""

    def __init__(self, max_requests: int, max_images_steps: int):
        self.max_requests, self.max_images_steps = max_requests, max_images_steps
        self.expected = 1

    def cost(self, request: Request) -> float:
        """max(1, n * steps * max_requests / max_images_steps): a budget of ``max_requests`` then
        holds at most max_requests requests and at most max_images_steps images x steps."""
        return max(1.0, request.n * request.steps * self.max_requests / self.max_images_steps)


@dataclass(frozen=True)
class Ticket:
    """One request in the batch queue, with its cost in the replica's budget."""

    request: Request
    cost: float
    fill: BatchFill


def batch_cost(tickets: list[Ticket]) -> float:
    """Serve's ``batch_size_fn``: the batch's cost, or the whole budget once it holds as many
    requests as the last batch did (so it stops waiting for company that is not coming)."""
    fill = tickets[0].fill
    cost = sum(ticket.cost for ticket in tickets)
    if cost <= fill.max_requests and len(tickets) >= fill.expected:
        return float(fill.max_requests)
    return cost


@serve.deployment(name="FewstepGenerator")
@serve.ingress()
class FewstepGenerator:
    """One replica: a generator in memory, a batch queue, a watcher on the serving pointer."""

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
        log_to_stderr()
        self.store = Store.open(store_uri)  # credentials from this replica's environment
        self.limits, self.poll_s, self.pointer = limits, poll_s, pointer
        self.watch_store = Watch(self.store, pointer, limits.solver, limits.default_steps, retry_s=retry_s)
        self.served: Served | None = None
        self.pinned: str | None = None
        self.watcher: asyncio.Task | None = None
        if max_batch_images_steps is None:
            max_batch_images_steps = ServeConfig.model_fields["max_batch_images_steps"].default
        self.fill = BatchFill(max_batch_size, max_batch_images_steps)
        self.draw.set_max_batch_size(max_batch_size)  # the budget, in the units of BatchFill.cost
        self.draw.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def __del__(self) -> None:
        """Serve's graceful shutdown calls this on the replica's event loop: stop watching the store
        before the loop's thread pool goes, or the next poll fails to schedule."""
        watcher = getattr(self, "watcher", None)
        if watcher is not None and not watcher.done():
            try:
                watcher.cancel()
            except RuntimeError:  # garbage-collected after its loop closed: nothing left to stop
                pass

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self, self.limits.max_body_bytes)

    # -- which model -------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model": ref}`` pins the app to a model; ``{"model": None}`` follows the pointer.

        The first model must load and pass the sanity batch, or the replica does not start."""
        self.pinned = user_config["model"]
        target = self.pinned or await asyncio.to_thread(self.store.get_pointer, self.pointer)
        if target is None:
            raise RuntimeError(
                f"no model is promoted in {self.store.uri} (pointer {self.pointer!r} is unset): "
                "run `fewstep run`, or serve one with --model REF"
            )
        if self.served is None or self.served.ref != target:
            self.served = await asyncio.to_thread(self.watch_store.load, target)
            log.info("serving %s from the store %s", target, self.store.uri)
        if self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def watch(self) -> None:
        """Every ``poll_s``: check the store, and follow the pointer unless pinned (see :class:`Watch`)."""
        while True:
            await asyncio.sleep(self.poll_s)
            served = self.served
            try:
                polled = await asyncio.to_thread(self.watch_store.poll, served, self.pinned is None)
            except Exception:  # noqa: BLE001 - a bug in one poll must not stop the watcher
                log.exception("the store watcher failed; still serving %s", served.ref)
                continue
            if self.served is served:  # a reconfigure meanwhile wins
                self.served = polled

    # -- batching -----------------------------------------------------------------------------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01, batch_size_fn=batch_cost)
    async def draw(self, tickets: list[Ticket]) -> list[Drawn | Exception]:
        """One forward pass per step for each (steps, sampler, guidance) group of the batch.

        Requests name no sampler: the batch draws with the sampler the served model is served with
        (a swap between validation and drawing changes the model, never fails the request)."""
        served = self.served  # the whole batch runs on the model it started with
        self.fill.expected = len(tickets)
        requests = [dataclasses.replace(t.request, sampler=served.sampler) for t in tickets]
        out: list[Drawn | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                served.generator.labels_for(request)  # the model may have changed since validation
                served.generator.sampler(request.sampler)
            except ValueError as error:
                out[i] = error
                continue
            groups.setdefault(request.group, []).append(i)
        for indices in groups.values():
            try:
                images = await asyncio.to_thread(served.generator.generate_many, [requests[i] for i in indices])
            except Exception as error:  # noqa: BLE001 - fail this group's requests only
                log.exception("generation failed for %d request(s)", len(indices))
                images = [error] * len(indices)
            for i, result in zip(indices, images):
                out[i] = (
                    result
                    if isinstance(result, Exception)
                    else Drawn(served, requests[i].sampler, result.pixels, result.nfe, result.seconds, len(indices))
                )
        return out

    # -- what the routes do -------------------------------------------------------------------

    async def generate(self, body: GenerateBody) -> Generated:
        served = self.served
        found = problems(body, self.limits, served.generator.num_classes)
        if found:
            raise HTTPException(status_code=422, detail=found)
        sampler = served.generator.sampler(served.sampler)
        steps = body.steps if body.steps is not None else self.limits.default_steps
        if sampler.max_steps is not None and steps > sampler.max_steps:
            raise HTTPException(
                status_code=422,
                detail=[
                    problem(
                        "steps",
                        f"steps={steps} is more than the served model takes: {served.ref} samples on a grid of "
                        f"{sampler.max_steps} times; use 1..{sampler.max_steps}",
                    )
                ],
            )
        if body.n * steps > self.fill.max_images_steps:
            raise HTTPException(
                status_code=422,
                detail=[
                    problem(
                        "n",
                        f"n={body.n} images x steps={steps} = {body.n * steps} is more than one batch may hold "
                        f"(serve.max_batch_images_steps={self.fill.max_images_steps}); ask for fewer images or steps",
                    )
                ],
            )
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        # Left out: the served model's own scale (promotion's record, or its card). A sampler that
        # takes no guidance (a distilled student) batches all its requests together.
        asked = body.guidance if body.guidance is not None else served.guidance
        guidance = float(asked) if sampler.guided else 1.0
        request = Request(
            n=body.n,
            steps=steps,
            sampler="",
            guidance=guidance,
            seed=seed,
            labels=tuple(body.labels) if body.labels is not None else None,
        )
        drawn = await self.draw(Ticket(request, self.fill.cost(request), self.fill))
        if isinstance(drawn, ValueError):
            raise HTTPException(status_code=422, detail=[problem("labels", str(drawn))])
        if isinstance(drawn, Exception):
            raise HTTPException(status_code=500, detail=f"generation failed: {type(drawn).__name__}: {drawn}")
        generator = drawn.served.generator
        guided = generator.sampler(drawn.sampler).guided
        return Generated(
            model=drawn.served.ref,
            family=generator.card.family,
            sampler=drawn.sampler,
            steps=steps,
            nfe=drawn.nfe,
            guidance=guidance if guided else None,
            seed=seed,
            labels=[int(y) for y in generator.labels_for(request)],
            pixels=drawn.pixels,
            batch_requests=drawn.batch_requests,
            seconds=drawn.seconds,
        )

    def model_info(self) -> dict[str, Any]:
        return {
            **self.served.card,
            "pinned": self.pinned is not None,
            "pointer": self.pointer,
            "served_steps": self.limits.default_steps,
            "limits": {**self.limits.as_dict(), "max_batch_images_steps": self.fill.max_images_steps},
        }

    def health(self) -> dict[str, Any]:
        return self.watch_store.health(self.served)


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
    store_uri: str, config: ServeConfig, model: str | None = None, *, max_batch_size: int | None = None
) -> serve.Application:
    """The deployment, sized from ``config``; ``model`` pins a ref, else the app follows the pointer.
    ``max_batch_size`` overrides the config's (1 turns batching off, for benchmarks)."""
    batch = config.max_batch_size if max_batch_size is None else max_batch_size
    deployment = FewstepGenerator.options(**deployment_options(config, model, batch))
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
) -> str:
    """Start Serve's HTTP proxy on host:port (Ray must be up) and deploy the app; returns its URL."""
    host = config.host if host is None else host
    port = config.port if port is None else port
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(store_uri, config, model, max_batch_size=max_batch_size), name=name, route_prefix="/")
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{shown}:{port}/"


def stop() -> None:
    """Tear down every Serve app and the proxy (Ray itself stays up)."""
    serve.shutdown()
