"""The HTTP surface of one replica: FastAPI routes, a body-size limit, image encodings.

    POST /v1/generate   {n, steps?, labels?, guidance?, seed?, format?} -> images + model ref + steps
    GET  /v1/model      ref, family, sampler, lineage and evaluation rows of the served model
    GET  /healthz       ok or degraded (with reasons), the served ref, the last failed model swap (if any)
    GET  /              the playground page;  GET /docs  OpenAPI
"""

from __future__ import annotations

import base64
import json
from importlib import resources
from typing import Any, Protocol

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse

from workers.pixels import encode_png
from workers.serving.model_card import strict_json
from workers.serving.request import GenerateBody


class Server(Protocol):
    async def generate(self, body: GenerateBody) -> dict[str, Any]: ...
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
    return resources.files("workers.serving").joinpath("playground.html").read_text()


def encode_images(pixels, fmt: str) -> list[Any]:
    """uint8 (N, H, W, C) -> base64 PNG strings, or nested lists (H, W, C) per image."""
    if fmt == "png":
        return [base64.b64encode(encode_png(image)).decode("ascii") for image in pixels]
    return [image.tolist() for image in pixels]


async def schema_errors(request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, except that a NaN in the echoed input cannot turn it into a 500."""
    return JSONResponse(status_code=422, content={"detail": strict_json(jsonable_encoder(error.errors(), sqlalchemy_safe=False))})


def make_api(server: Server, max_body_bytes: int) -> FastAPI:
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
        """The served model: ref, family, sampler, lineage, evaluation rows, and the request limits."""
        return server.model_info()

    @api.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return server.health()

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> str:
        return playground_html()

    return api
