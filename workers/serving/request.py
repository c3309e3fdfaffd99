"""What a request to ``POST /v1/generate`` may ask, checked before it reaches the model.

Three layers, so a bad request gets a 4xx and never fails the requests it would have been
batched with: the body size (413, in the HTTP layer, before parsing), the schema (422,
pydantic: strict types, finite floats, no unknown fields, :class:`GenerateBody`), then the
limits of the config and the served model (422, :func:`problems`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from infra.config import ServeConfig

MAX_SEED = 2**63 - 1


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
    def from_config(cls, config: ServeConfig) -> Limits:
        return cls(
            config.max_n, config.max_steps, config.max_guidance, config.max_body_bytes, config.steps, config.solver
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "max_n": self.max_n,
            "max_steps": self.max_steps,
            "max_guidance": self.max_guidance,
            "max_body_bytes": self.max_body_bytes,
        }


class GenerateBody(BaseModel):
    """The JSON body of POST /v1/generate. Types only; the limits are checked by :func:`problems`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    n: int = Field(description="how many images to draw")
    steps: int | None = Field(
        None, description="sampling steps (NFE per step: 1, or 2 for Heun); default: the served steps"
    )
    labels: list[int] | None = Field(
        None, description="one class id per image; num_classes means no class; default: no class"
    )
    guidance: float | None = Field(
        None,
        allow_inf_nan=False,
        description="classifier-free guidance scale (flow and diffusion models); default: the served model's "
        "own scale, as GET /v1/model shows it (`guidance`)",
    )
    adapter: bool | None = Field(
        None,
        description="a LoRA student (GET /v1/model shows `adapter_of`): true or left out draws the few-step "
        "student; false draws its base, the same network with the adapter off, with the ODE solver "
        "(ask for its steps, e.g. 32)",
    )
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
            found.append(
                problem("labels", f"got {len(body.labels)} labels for n={body.n}: give one label per image, or none")
            )
        bad = sorted({y for y in body.labels if not 0 <= y <= num_classes})
        if bad:
            found.append(
                problem(
                    "labels",
                    f"labels {bad[:10]} are out of range: use 0..{num_classes - 1}, or {num_classes} for no class",
                )
            )
    return found
