"""The Ray Serve app: a FastAPI ingress that draws images from the promoted generator.

    POST /v1/generate   {n, steps?, labels?, guidance?, seed?, format?} -> images + model ref + steps
    GET  /v1/model      ref, sampler, lineage and evaluation rows of the served model
    GET  /healthz       ok, the served ref, the last failed model swap (if any)
    GET  /              the playground page;  GET /docs  OpenAPI

A request is checked in three layers before it reaches the model, so a bad one gets a 4xx
and never fails the requests it would have been batched with: the body size (413, in
:class:`BodyLimit`, before parsing), the schema (422, pydantic, strict types, finite floats,
no unknown fields), then the limits of the config and the served model (422, :func:`problems`).

Accepted requests meet in one ``@serve.batch`` queue; a batch is split into groups that share
(steps, guidance) and each group is one :meth:`Generator.generate_many` call, i.e. one forward
pass per sampling step. Image ``i`` of a request is drawn from the seed ``(seed, i)``, so a
seeded request gets the same images alone or in a batch (up to the last bit of float
arithmetic: a batched matmul may round differently, which moves a pixel by at most one level).

Hot swap: unless the app is pinned to a ``model`` (its ``user_config``), each replica reads
the ``serving/current`` pointer every ``poll_s`` seconds and, when it moved, loads the new
generator beside the old one (digests verified) and swaps one attribute. A batch holds the
model it started with, so requests in flight finish on the old model and none is dropped;
the response's ``model`` names the one that drew it. A model that fails to load leaves the
old one serving and shows up in ``/healthz``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import math
import secrets
from dataclasses import dataclass
from importlib import resources
from typing import Any, Literal

from fastapi import FastAPI, HTTPException
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from infra.config import ServeConfig
from infra.store import SERVING_POINTER, Manifest, Store
from workers.images import encode_png
from workers.sampling import Generator, Request

log = logging.getLogger("fewstep.serve")

POINTER = SERVING_POINTER
APP_NAME = "fewstep"
MAX_SEED = 2**63 - 1
LINEAGE_LIMIT = 64  # manifests listed in /v1/model's lineage, nearest first


# --------------------------------------------------------------------------- what a request may ask


@dataclass(frozen=True)
class Limits:
    """The config's limits on one request, and the defaults a request may leave out."""

    max_n: int
    max_steps: int
    max_guidance: float
    max_body_bytes: int
    default_steps: int
    solver: str

    @classmethod
    def from_config(cls, config: ServeConfig) -> "Limits":
        return cls(config.max_n, config.max_steps, config.max_guidance, config.max_body_bytes,
                   config.steps, config.solver)


class GenerateBody(BaseModel):
    """The JSON body of POST /v1/generate. Types only; the limits are checked by :func:`problems`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(description="how many images to draw")
    steps: int | None = Field(None, description="sampling steps (NFE per step: 1, or 2 for Heun); default: the served steps")
    labels: list[int] | None = Field(None, description="one class id per image; num_classes means no class; default: no class")
    guidance: float | None = Field(None, allow_inf_nan=False, description="classifier-free guidance scale (flow models); default 1")
    seed: int | None = Field(None, description="same seed, same images; default: a random seed, returned")
    format: Literal["png", "array"] = Field("png", description="base64 PNGs, or uint8 arrays (H, W, C) as nested lists")


def problem(field_name: str, message: str) -> dict[str, Any]:
    """One entry of a 422 ``detail``, shaped like FastAPI's own validation errors."""
    return {"loc": ["body", field_name], "msg": message, "type": "limit"}


def problems(body: GenerateBody, limits: Limits, num_classes: int) -> list[dict[str, Any]]:
    """Everything wrong with a well-typed request against the limits and the served model."""
    found = []
    if not 1 <= body.n <= limits.max_n:
        found.append(problem("n", f"n={body.n} is out of range: ask for 1..{limits.max_n} images per request"))
    if body.steps is not None and not 1 <= body.steps <= limits.max_steps:
        found.append(problem("steps", f"steps={body.steps} is out of range: use 1..{limits.max_steps}"))
    if body.guidance is not None and not 0 <= body.guidance <= limits.max_guidance:
        found.append(problem("guidance", f"guidance={body.guidance} is out of range: use 0..{limits.max_guidance}"))
    if body.seed is not None and not 0 <= body.seed <= MAX_SEED:
        found.append(problem("seed", f"seed={body.seed} is out of range: use 0..{MAX_SEED}"))
    if body.labels is not None:
        if len(body.labels) != body.n:
            found.append(problem("labels", f"got {len(body.labels)} labels for n={body.n}: give one label per image, or none"))
        bad = sorted({y for y in body.labels if not 0 <= y <= num_classes})
        if bad:
            found.append(problem("labels", f"labels {bad[:10]} are out of range: use 0..{num_classes - 1}, "
                                           f"or {num_classes} for no class"))
    return found


# --------------------------------------------------------------------------- the served model


@dataclass(frozen=True)
class Served:
    """A loaded generator and what /v1/model says about it."""

    generator: Generator
    card: dict[str, Any]  # computed once, at load

    @property
    def ref(self) -> str:
        return self.generator.ref


def json_safe(value: Any) -> Any:
    """NaN and infinities (which Python's JSON parser accepts, and strict JSON does not) become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return value


def scalar_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (bool, int, float, str)) and len(str(v)) <= 80}


def lineage(store: Store, manifest: Manifest, limit: int = LINEAGE_LIMIT) -> list[dict[str, Any]]:
    """The manifests this one was built from (inputs, and the VAE it decodes with), nearest first."""
    seen, queue, out = {manifest.ref}, [*manifest.inputs, manifest.metrics.get("vae_ref")], []
    while queue and len(out) < limit:
        ref = queue.pop(0)
        if not ref or ref in seen:
            continue
        seen.add(ref)
        m = store.get_ref(ref)
        out.append({"ref": m.ref, "stage": m.stage, "created_at": m.created_at, "metrics": scalar_metrics(m.metrics)})
        queue.extend(m.inputs)
    return out


def evaluation_of(store: Store, ref: str) -> dict[str, Any] | None:
    """The rows of the newest evaluate stage that scored ``ref``, and its reference rows."""
    from workers.evaluate import REFERENCE, STAGE, evaluation_rows

    for manifest in reversed(store.list_manifests(STAGE)):
        if ref not in manifest.inputs:
            continue
        rows = evaluation_rows(store, manifest)
        mine = [r for r in rows if r["stage_key"] == ref]
        if mine:
            return {"ref": manifest.ref, "created_at": manifest.created_at, "rows": mine,
                    "references": [r for r in rows if r["sampler"] == REFERENCE]}
    return None


def model_card(store: Store, manifest: Manifest, generator: Generator, solver: str) -> dict[str, Any]:
    """What /v1/model says (JSON-safe: a diverged model's NaN FID must not turn it into a 500)."""
    return json_safe({
        "ref": manifest.ref,
        "stage": manifest.stage,
        "digest": manifest.digest,
        "created_at": manifest.created_at,
        "sampler": generator.sampler,
        "solver": None if generator.sampler == "consistency" else solver,
        "num_classes": generator.num_classes,
        "latent_shape": list(generator.shape),
        "metrics": scalar_metrics(manifest.metrics),
        "lineage": lineage(store, manifest),
        "evaluation": evaluation_of(store, manifest.ref),
    })


def load_served(store: Store, ref: str, solver: str) -> Served:
    """Load ``ref`` (every file's sha256 checked on read) and describe it."""
    manifest = store.get_ref(ref)
    generator = Generator.load(store, manifest)
    return Served(generator, model_card(store, manifest, generator, solver))


# --------------------------------------------------------------------------- HTTP


class BodyLimit:
    """ASGI middleware: 413 for a body over ``max_bytes``, before anything parses it.

    A declared Content-Length is checked first; otherwise (chunked bodies) the body is read
    up to the limit and replayed to the app in one message.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self.reject(send, f"request body of {declared.decode(errors='replace')} bytes is over "
                                           f"the limit of {self.max_bytes} bytes")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self.reject(send, f"request body is over the limit of {self.max_bytes} bytes")
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def reject(send, message: str) -> None:
        body = json.dumps({"detail": message}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def playground_html() -> str:
    return resources.files("workers").joinpath("playground.html").read_text()


def encode_images(pixels, fmt: str) -> list[Any]:
    """uint8 (N, H, W, C) -> base64 PNG strings, or nested lists (H, W, C) per image."""
    if fmt == "png":
        return [base64.b64encode(encode_png(image)).decode("ascii") for image in pixels]
    return [image.tolist() for image in pixels]


async def schema_errors(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that a NaN in the echoed input cannot turn it into a 500."""
    return JSONResponse(status_code=422, content={"detail": json_safe(jsonable_encoder(error.errors(), sqlalchemy_safe=False))})


def make_api(server: "FewstepGenerator", max_body_bytes: int) -> FastAPI:
    """The HTTP surface of one replica; every route calls into ``server``."""
    api = FastAPI(title="fewstep", version="1",
                  description="Few-step image generation from the promoted fewstep model. Try it at /.")
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    api.add_exception_handler(RequestValidationError, schema_errors)

    @api.post("/v1/generate")
    async def generate(body: GenerateBody) -> dict[str, Any]:
        """Draw ``n`` images from the served model (the response names it: ``model``)."""
        return await server.generate(body)

    @api.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The served model: ref, sampler, lineage, evaluation rows, and the request limits."""
        return server.model_info()

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return server.health()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return playground_html()

    return api


@dataclass(frozen=True)
class Drawn:
    """What one request got out of a batch."""

    served: Served
    pixels: Any  # (n, H, W, C) uint8
    nfe: int
    seconds: float
    batch_requests: int  # requests that shared its forward passes


@serve.deployment(name="FewstepGenerator")
@serve.ingress()
class FewstepGenerator:
    """One replica: a generator in memory, a batch queue, a watcher on the serving pointer."""

    def __init__(self, store: Store | str, limits: Limits, max_batch_size: int, batch_wait_timeout_s: float,
                 poll_s: float, pointer: str = POINTER):
        # A Store pickles with its endpoint and keys, so replicas on other nodes reach the
        # same S3 as the driver whatever their environment; a URI is opened here.
        self.store = store if isinstance(store, Store) else Store.open(store)
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
        """One forward pass per step for each (steps, guidance) group of the batch."""
        served = self.served  # the whole batch runs on the model it started with
        out: list[Drawn | Exception | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            try:
                served.generator.labels_for(request)  # the model may have changed since validation
            except ValueError as error:
                out[i] = error
                continue
            groups.setdefault((request.steps, request.solver, request.guidance), []).append(i)
        for indices in groups.values():
            try:
                images = await asyncio.to_thread(served.generator.generate_many, [requests[i] for i in indices])
            except Exception as error:  # noqa: BLE001 - fail this group's requests only
                log.exception("generation failed for %d request(s)", len(indices))
                images = [error] * len(indices)
            for i, result in zip(indices, images):
                out[i] = result if isinstance(result, Exception) else Drawn(
                    served, result.pixels, result.nfe, result.seconds, len(indices))
        return out

    # -- what the routes do -------------------------------------------------------------------

    async def generate(self, body: GenerateBody) -> dict[str, Any]:
        served = self.served
        found = problems(body, self.limits, served.generator.num_classes)
        if found:
            raise HTTPException(status_code=422, detail=found)
        consistency = served.generator.sampler == "consistency"
        steps = body.steps if body.steps is not None else self.limits.default_steps
        seed = body.seed if body.seed is not None else secrets.randbelow(MAX_SEED)
        # A consistency model was distilled at one guidance and takes none: its requests all batch together.
        guidance = 1.0 if consistency or body.guidance is None else float(body.guidance)
        request = Request(n=body.n, steps=steps, labels=tuple(body.labels) if body.labels is not None else None,
                          guidance=guidance, seed=seed, solver=self.limits.solver)
        drawn = await self.draw(request)
        if isinstance(drawn, ValueError):
            raise HTTPException(status_code=422, detail=[problem("labels", str(drawn))])
        if isinstance(drawn, Exception):
            raise HTTPException(status_code=500, detail=f"generation failed: {type(drawn).__name__}: {drawn}")
        generator = drawn.served.generator
        return {
            "model": drawn.served.ref,
            "sampler": generator.sampler,
            "solver": None if consistency else request.solver,
            "steps": steps,
            "nfe": drawn.nfe,
            "guidance": None if consistency else guidance,
            "seed": seed,
            "labels": [int(y) for y in generator.labels_for(request)],
            "format": body.format,
            "shape": list(drawn.pixels.shape[1:]),
            "images": encode_images(drawn.pixels, body.format),
            "batch_requests": drawn.batch_requests,
            "seconds": round(drawn.seconds, 6),
        }

    def model_info(self) -> dict[str, Any]:
        limits = self.limits
        return {**self.served.card, "pinned": self.pinned is not None, "pointer": self.pointer,
                "served_steps": limits.default_steps,
                "limits": {"max_n": limits.max_n, "max_steps": limits.max_steps, "max_guidance": limits.max_guidance,
                           "max_body_bytes": limits.max_body_bytes}}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "model": self.served.ref, "swap_error": self.swap_error}


# --------------------------------------------------------------------------- building and running


def deployment_options(config: ServeConfig, model: str | None, max_batch_size: int) -> dict[str, Any]:
    """Serve's deployment options from the config: replicas or autoscaling, resources, queue limits."""
    scaling: dict[str, Any] = {"num_replicas": config.num_replicas}
    if config.max_replicas is not None:
        scaling = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": config.num_replicas, "max_replicas": config.max_replicas,
            "target_ongoing_requests": config.target_ongoing_requests}}
    return {
        **scaling,
        "ray_actor_options": {"num_cpus": config.cpus_per_replica, "num_gpus": config.gpus_per_replica},
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
    store = Store.open(store_uri) if isinstance(store_uri, str) else store_uri
    return deployment.bind(store, Limits.from_config(config), batch, config.batch_wait_timeout_s, config.poll_s)


def resolve_model(store: Store, model: str | None) -> Manifest:
    """The manifest to serve: ``model`` if given, else what ``serving/current`` points at."""
    ref = model or store.get_pointer(POINTER)
    if ref is None:
        raise LookupError(f"no model is promoted in {store.uri} (pointer {POINTER!r} is unset): "
                          "run `fewstep run` first, or pass --model REF (`fewstep status` lists refs)")
    manifest = store.get_ref(ref)
    if "sampler" not in manifest.metrics:
        raise LookupError(f"{ref} is a {manifest.stage!r} output, not a generator; serve a base, reflow or "
                          "consistency ref")
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
