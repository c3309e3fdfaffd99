"""Which model a replica serves: loaded, checked, swapped; and what ``/healthz`` says about it.

A model is served only after it

1. loads with every file's sha256 checked (a flipped byte is an :class:`IntegrityError`), and
2. passes :func:`sanity_check`: its weights are finite, and a seeded batch of 2 images at the
   served steps (one with a class, one without) gives finite latents and pixels. A model
   with NaN weights would otherwise answer 200 with black images.

That holds at start (a replica that cannot load its first model fails to start: there is
nothing to fall back on) and before every hot swap.

Each ``poll_s`` a replica's :class:`Watch` looks at the store once: the pointer (unless the
app is pinned) and the served model's manifest. A swap that fails keeps the old model serving
and is not retried every poll: the same ref is tried again after ``retry_s``, doubling up to
``max_retry_s``, or at once when the pointer moves to another ref. Each failed attempt logs
one line, without a traceback (the reason names the file or tensor that was wrong).

A request that leaves ``guidance`` out is drawn at the served model's own scale
(:func:`default_guidance`): the one promotion recorded with the pointer when the pointer names
this model, else its card's guidance, else 1.

``/healthz`` says ``degraded``, with the reasons, while the pointer names a model that could
not be swapped in, while the store cannot be read, and while the served model's manifest is
gone from the store (deleted by hand, or the store moved): the replica still answers from the
model in its memory, but a restarted replica could not load it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from infra.cards import GeneratorCard
from infra.errors import describe
from infra.store import SERVING_POINTER, Manifest, Store
from models.lora import LoRADiT
from models.sampling import preferred_sampler
from workers.generator import Generator, Request
from workers.serving.model_card import model_card

log = logging.getLogger("fewstep.serve")

SANITY_SEED = 0
RETRY_S = 300.0  # a failed ref is tried again after this long (doubling each time) ...
MAX_RETRY_S = 3600.0  # ... up to this; at once when the pointer moves to another ref


class UnfitModel(Exception):
    """A model that loads but cannot draw finite images (NaN or inf weights, or an overflow): never served."""


@dataclass(frozen=True)
class Served:
    """A loaded generator, the sampler it is served with, and what /v1/model says about it."""

    generator: Generator
    sampler: str
    card: dict[str, Any]  # computed once, at load
    guidance: float = 1.0  # for requests that leave guidance out (:func:`default_guidance`)
    base: Generator | None = None  # an adapter's base, the same network with the adapter off
    base_sampler: str | None = None  # the ODE solver the base is drawn with

    @property
    def ref(self) -> str:
        return self.generator.ref


def non_finite(x: Tensor) -> str | None:
    """``None`` when every value of ``x`` is finite, else how many are NaN and how many infinite."""
    if bool(torch.isfinite(x).all()):
        return None
    return f"{int(torch.isnan(x).sum())} NaN and {int(torch.isinf(x).sum())} infinite of {x.numel()} values"


def sanity_check(
    generator: Generator, sampler: str, steps: int, seed: int = SANITY_SEED, guidance: float = 1.0
) -> None:
    """Raise :class:`UnfitModel` unless ``generator`` has finite weights and draws finite images.

    The batch: 2 images seeded by ``seed``, label 0 and the null label, at ``steps`` (capped by
    the sampler's own maximum) with ``sampler`` at ``guidance``: the cost of one small request."""
    for part, module in (("network", generator.net), ("VAE", generator.vae)):
        bad = [
            name
            for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
        ]
        if bad:
            raise UnfitModel(
                f"{generator.ref}: {len(bad)} tensor(s) of its {part} hold NaN or inf "
                f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); it is not served: "
                "re-train it (lower the learning rate, clip gradients) or promote another model"
            )
    chosen = generator.sampler(sampler)
    steps = min(steps, chosen.max_steps or steps)
    request = Request(n=2, steps=steps, sampler=sampler, labels=(0, generator.num_classes), seed=seed)
    noise, y = generator.noise_for(request), generator.labels_for(request)
    x_1, _ = generator.sample_latents(noise, y, steps, sampler, guidance)
    pixels = generator.decode(x_1)  # (2, C, H, W) in the model range, before clipping to uint8
    for what, values in (("latents", x_1), ("pixels", pixels)):
        bad = non_finite(values)
        if bad:
            raise UnfitModel(
                f"{generator.ref} draws non-finite {what} ({bad}) in a seeded sanity batch of 2 images "
                f"at {steps} step(s) with {sampler}; it is not served: re-train it or promote another model"
            )


def default_guidance(store: Store, manifest: Manifest, pointer: str = SERVING_POINTER) -> float:
    """The guidance scale a request without one is drawn at: the scale promotion recorded with
    ``pointer`` when the pointer names this model (its best row at the served steps), else the
    model's card's (a student's teacher scale, a reflow round's pairs'), else 1.0 (a model served
    by hand with ``--model REF``, or promoted before scales were recorded)."""
    record = store.pointer_record(pointer)
    if record is not None and record["ref"] == manifest.ref:
        recorded = record.get("guidance")
        if isinstance(recorded, (int, float)) and not isinstance(recorded, bool) and math.isfinite(recorded):
            return float(recorded)
    card = GeneratorCard.from_manifest(manifest)
    return float(card.guidance) if card.guidance is not None else 1.0


class AdapterSwitch(nn.Module):
    """A LoRA network (models/lora.py) seen with its adapters on (the student) or off (its base): two
    models in one network's memory. Each call sets the adapters' switch, so the calls of both views
    take one lock (a replica draws one group at a time anyway)."""

    def __init__(self, net: LoRADiT, enabled: bool, lock: threading.Lock):
        super().__init__()
        self.net, self.enabled, self.lock = net, enabled, lock
        self.num_classes = net.num_classes

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        with self.lock, self.net.adapters_enabled(self.enabled):
            return self.net(*args, **kwargs)


def adapter_views(store: Store, student: Generator) -> tuple[Generator, Generator]:
    """(student, base) of a generator whose network is an adapter on its card's ``adapter_of``: one
    network, one VAE, two generators."""
    lock = threading.Lock()
    base = store.get_ref(student.card.adapter_of)
    on, off = (AdapterSwitch(student.net, enabled, lock) for enabled in (True, False))
    return (
        Generator(student.ref, student.card, on, student.vae, student.device),
        Generator(base.ref, GeneratorCard.from_manifest(base), off, student.vae, student.device),
    )


def load_served(store: Store, ref: str, solver: str, steps: int, pointer: str = SERVING_POINTER) -> Served:
    """Load ``ref`` (every file's sha256 checked on read), check it draws finite images at its
    default guidance, describe it. An adapter (a LoRA student) is served with its base beside it: the
    same network with the adapter off, drawn with ``solver`` when a request asks ``adapter: false``."""
    manifest = store.get_ref(ref)
    generator = Generator.load(store, manifest)
    sampler = preferred_sampler(generator.card.family, solver).name
    guidance = default_guidance(store, manifest, pointer)
    base = base_sampler = None
    if isinstance(generator.net, LoRADiT):
        generator, base = adapter_views(store, generator)
        base_sampler = preferred_sampler(base.card.family, solver).name
        sanity_check(base, base_sampler, steps, guidance=guidance)
    sanity_check(generator, sampler, steps, guidance=guidance)
    card = model_card(store, manifest, sampler, guidance)
    return Served(generator, sampler, card, guidance, base, base_sampler)


@dataclass(frozen=True)
class FailedSwap:
    """The last ref that could not be swapped in, why, and when it is tried again."""

    ref: str
    error: str  # "ClassName: message"
    attempts: int
    retry_at: float  # on the Watch's clock


class Watch:
    """One replica's view of the store, polled from a thread; no Ray here, so tests drive it directly.

    ``clock`` is monotonic seconds (a parameter so that tests can move time)."""

    def __init__(
        self,
        store: Store,
        pointer: str,
        solver: str,
        steps: int,
        *,
        retry_s: float = RETRY_S,
        max_retry_s: float = MAX_RETRY_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.store, self.pointer, self.solver, self.steps = store, pointer, solver, steps
        self.retry_s, self.max_retry_s, self.clock = retry_s, max_retry_s, clock
        self.failed: FailedSwap | None = None
        self.problems: tuple[str, ...] = ()  # what this poll found wrong with the store
        self._lock = threading.Lock()  # one poll at a time

    def load(self, ref: str) -> Served:
        return load_served(self.store, ref, self.solver, self.steps, self.pointer)

    def poll(self, served: Served, follow: bool) -> Served:
        """Look at the store once; return the model to serve from now on (``served`` unless a swap worked).

        ``follow``: the app follows the pointer (it is not pinned to a ref)."""
        with self._lock:
            problems: list[str] = []
            target = self._read(problems, served, follow)
            if target is not None and target != served.ref:
                served = self._try_swap(served, target)
            elif follow and target == served.ref:
                self.failed = None  # the pointer came back to the served model
            if not follow:
                self.failed = None
            self._report(tuple(problems))
            return served

    def _read(self, problems: list[str], served: Served, follow: bool) -> str | None:
        """The pointer's ref (None when not following or unreadable); store problems go to ``problems``."""
        uri = self.store.uri
        try:
            stage, key = served.ref.split("/", 1)
            if self.store.get(stage, key) is None:
                problems.append(
                    f"the served model {served.ref} is no longer in the store {uri} (deleted, or the store "
                    "moved): this replica serves it from memory, but a restarted one could not load it"
                )
        except Exception as error:  # noqa: BLE001 - any failure to read is reported, and serving goes on
            problems.append(f"cannot read the store {uri}: {describe(error)}")
            return None  # the pointer would fail the same way
        if not follow:
            return None
        try:
            ref = self.store.get_pointer(self.pointer)
        except Exception as error:  # noqa: BLE001
            problems.append(f"cannot read the pointer {self.pointer!r} in {uri}: {describe(error)}")
            return None
        if ref is None:
            problems.append(
                f"the pointer {self.pointer!r} is unset in {uri} (the store was deleted or moved, or the "
                f"pointer removed); still serving {served.ref}"
            )
        return ref

    def _try_swap(self, served: Served, ref: str) -> Served:
        now = self.clock()
        failed = self.failed if self.failed is not None and self.failed.ref == ref else None
        if failed is not None and now < failed.retry_at:
            return served  # backing off: /healthz still says why
        try:
            log.info("pointer %s moved to %s; loading it", self.pointer, ref)
            new = self.load(ref)
        except Exception as error:  # noqa: BLE001 - keep serving the old model, say why once
            attempts = failed.attempts + 1 if failed is not None else 1
            wait = min(self.max_retry_s, self.retry_s * 2 ** (attempts - 1))
            self.failed = FailedSwap(ref, describe(error), attempts, now + wait)
            log.warning(
                "could not switch to %s (pointer %s, attempt %d): %s; still serving %s; next try in %.0f s, "
                "or at once when the pointer moves",
                ref,
                self.pointer,
                attempts,
                self.failed.error,
                served.ref,
                wait,
            )
            return served
        self.failed = None
        log.info("serving %s (was %s)", ref, served.ref)
        return new

    def _report(self, problems: tuple[str, ...]) -> None:
        """Log store problems when they change, not every poll."""
        if problems != self.problems:
            for problem in problems:
                if problem not in self.problems:
                    log.warning("degraded: %s", problem)
            if not problems:
                log.info("the store %s reads fine again", self.store.uri)
        self.problems = problems

    def health(self, served: Served) -> dict[str, Any]:
        """What ``/healthz`` says: ``ok``, or ``degraded`` with a reason per problem."""
        reasons = list(self.problems)
        failed = self.failed
        detail = None
        if failed is not None:
            retry_in = max(0.0, failed.retry_at - self.clock())
            reasons.append(
                f"could not switch to {failed.ref} (pointer {self.pointer!r}): {failed.error}; still serving "
                f"{served.ref}; next try in {math.ceil(retry_in)} s, or at once when the pointer moves"
            )
            detail = {
                "ref": failed.ref,
                "error": failed.error,
                "attempts": failed.attempts,
                "retry_in_s": round(retry_in, 1),
            }
        return {
            "status": "degraded" if reasons else "ok",
            "model": served.ref,
            "reasons": reasons,
            "failed_swap": detail,
        }
