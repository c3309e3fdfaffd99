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

Hot swap: unless the app is pinned to a ``model`` (its ``user_config``), each replica reads
the ``serving/current`` pointer every ``poll_s`` seconds and, when it moved, loads the new
generator beside the old one (digests verified) and swaps one attribute. A batch holds the
model it started with, so requests in flight finish on the old model and none is dropped;
the response's ``model`` names the one that drew it. A model that fails to load leaves the
old one serving and shows up in ``/healthz``.
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
from models.sampling import preferred_sampler
from workers.generator import Generator, Request
from workers.runtime import remote_options
from workers.serving.http import encode_images, make_api
from workers.serving.model_card import model_card
from workers.serving.request import MAX_SEED, GenerateBody, Limits, problem, problems

log = logging.getLogger("fewstep.serve")

POINTER = SERVING_POINTER
APP_NAME = "fewstep"


@dataclass(frozen=True)
class Served:
    """A loaded generator, the sampler it is served with, and what /v1/model says about it."""

    generator: Generator
    sampler: str
    card: dict[str, Any]  # computed once, at load

    @property
    def ref(self) -> str:
        return self.generator.ref


def load_served(store: Store, ref: str, solver: str) -> Served:
    """Load ``ref`` (every file's sha256 checked on read) and describe it."""
    manifest = store.get_ref(ref)
    generator = Generator.load(store, manifest)
    sampler = preferred_sampler(generator.card.family, solver).name
    return Served(generator, sampler, model_card(store, manifest, sampler))


@dataclass(frozen=True)
class Drawn:
    """What one request got out of a batch."""

    served: Served
    sampler: str
    pixels: Any  # (n, H, W, C) uint8
    nfe: int
    seconds: float
    batch_requests: int  # requests that shared its forward passes


@serve.deployment(name="FewstepGenerator")
@serve.ingress()
class FewstepGenerator:
    """One replica: a generator in memory, a batch queue, a watcher on the serving pointer."""

    def __init__(self, store_uri: str, limits: Limits, max_batch_size: int, batch_wait_timeout_s: float,
                 poll_s: float, pointer: str = POINTER):
        self.store = Store.open(store_uri)  # credentials from this replica's environment
        self.limits, self.poll_s, self.pointer = limits, poll_s, pointer
        self.served: Served | None = None
        self.pinned: str | None = None
        self.swap_error: str | None = None
        self.watcher: asyncio.Task | None = None
        self.draw.set_max_batch_size(max_batch_size)
        self.draw.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return make_api(self, self.limits.max_body_bytes)

    # -- which model -------------------------------------------------------------------------

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """``{"model": ref}`` pins the app to a model; ``{"model": None}`` follows the pointer."""
        self.pinned = user_config["model"]
        target = self.pinned or await asyncio.to_thread(self.store.get_pointer, self.pointer)
        if target is None:
            raise RuntimeError(f"no model is promoted in {self.store.uri} (pointer {self.pointer!r} is unset): "
                               "run `fewstep run`, or serve one with --model REF")
        if self.served is None or self.served.ref != target:
            self.served = await asyncio.to_thread(load_served, self.store, target, self.limits.solver)
            log.info("serving %s", target)
        if self.pinned is None and self.watcher is None:
            self.watcher = asyncio.get_running_loop().create_task(self.watch())

    async def watch(self) -> None:
        """Follow the pointer; load a new model next to the old one, then swap one reference."""
        while True:
            await asyncio.sleep(self.poll_s)
            if self.pinned is not None:
                continue
            try:
                ref = await asyncio.to_thread(self.store.get_pointer, self.pointer)
                if ref is not None and ref != self.served.ref:
                    log.info("pointer %s moved to %s; loading it", self.pointer, ref)
                    self.served = await asyncio.to_thread(load_served, self.store, ref, self.limits.solver)
                    self.swap_error = None
            except Exception as error:  # noqa: BLE001 - keep serving the old model, and say why in /healthz
                self.swap_error = f"{type(error).__name__}: {error}"
                log.exception("could not switch to the model at %s; still serving %s", self.pointer, self.served.ref)

    # -- batching -----------------------------------------------------------------------------

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.01)
    async def draw(self, requests: list[Request]) -> list[Drawn | Exception]:
        """One forward pass per step for each (steps, sampler, guidance) group of the batch.

        Requests name no sampler: the batch draws with the sampler the served model is served with
        (a swap between validation and drawing changes the model, never fails the request)."""
        served = self.served  # the whole batch runs on the model it started with
        requests = [dataclasses.replace(r, sampler=served.sampler) for r in requests]
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
                out[i] = result if isinstance(result, Exception) else Drawn(
                    served, requests[i].sampler, result.pixels, result.nfe, result.seconds, len(indices))
        return out

    # -- what the routes do -------------------------------------------------------------------

    async def generate(self, body: GenerateBody) -> dict[str, Any]:
        served = self.served
        found = problems(body, self.limits, served.generator.num_classes)
        if found:
            raise HTTPException(status_code=422, detail=found)
        sampler = served.generator.sampler(served.sampler)
        steps = body.steps if body.steps is not None else self.limits.default_steps
        if sampler.max_steps is not None and steps > sampler.max_steps:
            raise HTTPException(status_code=422, detail=[problem(
                "steps", f"steps={steps} is more than the served model takes: {served.ref} samples on a grid of "
                         f"{sampler.max_steps} times; use 1..{sampler.max_steps}")])
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        # A sampler that takes no guidance (a distilled student) batches all its requests together.
        guidance = float(body.guidance) if sampler.guided and body.guidance is not None else 1.0
        request = Request(n=body.n, steps=steps, sampler="", guidance=guidance, seed=seed,
                          labels=tuple(body.labels) if body.labels is not None else None)
        drawn = await self.draw(request)
        if isinstance(drawn, ValueError):
            raise HTTPException(status_code=422, detail=[problem("labels", str(drawn))])
        if isinstance(drawn, Exception):
            raise HTTPException(status_code=500, detail=f"generation failed: {type(drawn).__name__}: {drawn}")
        generator = drawn.served.generator
        guided = generator.sampler(drawn.sampler).guided
        return {
            "model": drawn.served.ref,
            "family": generator.card.family,
            "sampler": drawn.sampler,
            "steps": steps,
            "nfe": drawn.nfe,
            "guidance": guidance if guided else None,
            "seed": seed,
            "labels": [int(y) for y in generator.labels_for(request)],
            "format": body.format,
            "shape": list(drawn.pixels.shape[1:]),
            "images": encode_images(drawn.pixels, body.format),
            "batch_requests": drawn.batch_requests,
            "seconds": round(drawn.seconds, 6),
        }

    def model_info(self) -> dict[str, Any]:
        return {**self.served.card, "pinned": self.pinned is not None, "pointer": self.pointer,
                "served_steps": self.limits.default_steps, "limits": self.limits.as_dict()}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.served.ref, "swap_error": self.swap_error}


# --------------------------------------------------------------------------- building and running


def deployment_options(config: ServeConfig, model: str | None, max_batch_size: int) -> dict[str, Any]:
    """Serve's deployment options from the config: replicas or autoscaling, resources, queue limits."""
    resources = config.resources
    scaling: dict[str, Any] = {"num_replicas": resources.workers}
    if config.max_replicas is not None:
        scaling = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": resources.workers, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests}}
    return {
        **scaling,
        "ray_actor_options": remote_options(resources),
        "max_ongoing_requests": max(config.max_ongoing_requests, max_batch_size),
        "max_queued_requests": config.max_queued_requests,
        "max_constructor_retry_count": 3,  # a model that fails to load fails the deploy, not 20 retries later
        "user_config": {"model": model},
    }


def build_app(store_uri: str, config: ServeConfig, model: str | None = None, *,
              max_batch_size: int | None = None) -> serve.Application:
    """The deployment, sized from ``config``; ``model`` pins a ref, else the app follows the pointer.
    ``max_batch_size`` overrides the config's (1 turns batching off, for benchmarks)."""
    batch = config.max_batch_size if max_batch_size is None else max_batch_size
    deployment = FewstepGenerator.options(**deployment_options(config, model, batch))
    return deployment.bind(str(store_uri), Limits.from_config(config), batch, config.batch_wait_timeout_s,
                           config.poll_s)


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
        raise NotCommitted(f"no model is promoted in {store.uri} (pointer {POINTER!r} is unset): "
                          "run `fewstep run` first, or pass --model REF (`fewstep status` lists refs)")
    manifest = store.get_ref(ref)
    if not GeneratorCard.is_generator(manifest):
        raise NotCommitted(f"{ref} is a {manifest.stage!r} output, not a generator; serve a base, reflow or "
                          "consistency ref")
    GeneratorCard.from_manifest(manifest)
    return manifest


def start(store_uri: str, config: ServeConfig, model: str | None = None, *, host: str | None = None,
          port: int | None = None, name: str = APP_NAME, max_batch_size: int | None = None) -> str:
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
