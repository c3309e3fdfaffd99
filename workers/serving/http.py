"""The HTTP surface of one replica: FastAPI routes, a body-size limit, image encodings.

    POST /v1/generate   {n, steps?, labels?, guidance?, seed?, format?} -> images + model ref + steps
    GET  /v1/model      ref, family, sampler, default guidance, lineage and evaluation rows of the served model
    GET  /healthz       ok or degraded (with reasons), the served ref, the last failed model swap (if any)
    GET  /              the playground page;  GET /docs  OpenAPI

``/v1/generate`` answers in the format the ``Accept`` header asks for:

    application/json (default)   {"images": [base64 PNG | nested lists], "model": ..., "steps": ..., ...}
    image/png                    the PNG itself (n = 1 only)
    application/octet-stream     the raw uint8 pixels, C order, shape (n, H, W, C) in ``X-Shape``

The binary answers carry the JSON's other fields as ``X-*`` headers (:data:`HEADERS`). PNGs are
written at zlib level 1 (fast; a 16x16 image is a few hundred bytes either way), in a thread
when the batch is large, so the replica's event loop keeps taking requests for the next batch.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
from dataclasses import dataclass
from importlib import resources
from typing import Any, Protocol

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image

from workers.serving.model_card import strict_json
from workers.serving.request import GenerateBody

PNG, RAW, JSON = "image/png", "application/octet-stream", "application/json"
PNG_LEVEL = 1  # zlib level: fast; tiny images barely shrink at 9
INLINE_PNG_BYTES = 1 << 16  # encode smaller batches on the event loop (a thread hop costs more)


@dataclass(frozen=True)
class Generated:
    """What the replica drew for one request; :func:`respond` turns it into the format asked for."""

    model: str
    family: str
    sampler: str
    steps: int
    nfe: int
    guidance: float | None
    seed: int
    labels: list[int]
    pixels: np.ndarray  # (n, H, W, C) uint8
    batch_requests: int  # requests that shared its forward passes
    seconds: float

    def fields(self) -> dict[str, Any]:
        """Everything but the pixels, which their shape (H, W, C) stands for, as the JSON answer names it."""
        named = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "pixels"}
        return {**named, "seconds": round(self.seconds, 6), "shape": list(self.pixels.shape[1:])}


# The binary answers' headers: header -> the JSON field it carries.
HEADERS = {
    "X-Model": "model",
    "X-Family": "family",
    "X-Sampler": "sampler",
    "X-Steps": "steps",
    "X-NFE": "nfe",
    "X-Guidance": "guidance",
    "X-Seed": "seed",
    "X-Labels": "labels",
    "X-Batch-Requests": "batch_requests",
    "X-Seconds": "seconds",
}


class Server(Protocol):
    async def generate(self, body: GenerateBody) -> Generated: ...
    def model_info(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...


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
            return await self.reject(
                send,
                f"request body of {declared.decode(errors='replace')} bytes is over "
                f"the limit of {self.max_bytes} bytes",
            )
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
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


def playground_html() -> str:
    return resources.files("workers.serving").joinpath("playground.html").read_text()


def fast_png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (L or RGB) at zlib level :data:`PNG_LEVEL`."""
    buffer = io.BytesIO()
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(
        buffer, format="PNG", compress_level=PNG_LEVEL
    )
    return buffer.getvalue()


def encode_images(pixels, fmt: str) -> list[Any]:
    """uint8 (N, H, W, C) -> base64 PNG strings, or nested lists (H, W, C) per image."""
    if fmt == "png":
        return [base64.b64encode(fast_png(image)).decode("ascii") for image in pixels]
    return [image.tolist() for image in pixels]


def wanted(accept: str) -> str:
    """The answer's media type from an Accept header: the first binary type it names, else JSON."""
    for part in accept.split(","):
        media = part.split(";", 1)[0].strip().lower()
        if media in (PNG, RAW):
            return media
    return JSON


def binary_headers(generated: Generated) -> dict[str, str]:
    fields = generated.fields()
    headers = {
        name: ",".join(map(str, value)) if isinstance(value, list) else str(value)
        for name, value in ((h, fields[f]) for h, f in HEADERS.items())
    }
    headers["X-Shape"] = ",".join(str(d) for d in generated.pixels.shape)
    headers["X-Dtype"] = "uint8"
    return headers


async def off_loop(function, *args):
    """Run ``function`` here for small work, in a thread for large (keeps the batch queue fed)."""
    pixels = args[0]
    if pixels.nbytes <= INLINE_PNG_BYTES:
        return function(*args)
    return await asyncio.to_thread(function, *args)


async def respond(generated: Generated, accept: str, fmt: str) -> Response:
    """The answer to one generate request, in the media type ``accept`` asks for."""
    media = wanted(accept)
    if media == RAW:
        return Response(generated.pixels.tobytes(), media_type=RAW, headers=binary_headers(generated))
    if media == PNG:
        if len(generated.pixels) != 1:
            return JSONResponse(
                status_code=406,
                content={
                    "detail": (
                        f"Accept: image/png returns one image, but n={len(generated.pixels)}: ask for n=1, or "
                        "Accept: application/octet-stream (raw uint8 pixels) or application/json"
                    )
                },
            )
        data = await off_loop(lambda p: fast_png(p[0]), generated.pixels)
        return Response(data, media_type=PNG, headers=binary_headers(generated))
    images = await off_loop(encode_images, generated.pixels, fmt)
    body = {**generated.fields(), "format": fmt, "images": images}
    return Response(json.dumps(body, separators=(",", ":")).encode(), media_type=JSON)


async def schema_errors(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that a NaN in the echoed input cannot turn it into a 500."""
    return JSONResponse(
        status_code=422, content={"detail": strict_json(jsonable_encoder(error.errors(), sqlalchemy_safe=False))}
    )


def make_api(server: Server, max_body_bytes: int) -> FastAPI:
    """The HTTP surface of one replica; every route calls into ``server``."""
    api = FastAPI(
        title="fewstep",
        version="1",
        description="Few-step image generation from the promoted fewstep model. Try it at /.",
    )
    api.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    api.add_exception_handler(RequestValidationError, schema_errors)

    @api.post(
        "/v1/generate",
        response_class=Response,
        responses={
            200: {
                "description": "JSON by default; the raw image(s) with Accept: image/png (n = 1) or "
                "application/octet-stream (uint8, shape in X-Shape)",
                "content": {JSON: {}, PNG: {}, RAW: {}},
            }
        },
    )
    async def generate(body: GenerateBody, request: Request) -> Response:
        """Draw ``n`` images from the served model (the response names it: ``model``)."""
        return await respond(await server.generate(body), request.headers.get("accept", ""), body.format)

    @api.get("/v1/model")
    async def model() -> dict[str, Any]:
        """The served model: ref, family, sampler, lineage, evaluation rows, and the request limits."""
        return server.model_info()

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return server.health()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return playground_html()

    return api
