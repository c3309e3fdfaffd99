"""One replica's work without the server around it: validate, batch, draw, answer; follow the pointer.

:class:`Replica` is what a request meets once it is parsed: the limits of the config and the
served model (:mod:`workers.serving.request`), one :class:`~workers.generator.Generator` call per
(steps, sampler, guidance) group of a batch, and the :class:`~workers.serving.http.Generated`
answer. It knows nothing of the server that feeds it: the batch queue is :meth:`Replica.draw`,
which a subclass supplies. The Serve deployment (:mod:`workers.serving.app`) supplies it with
``@serve.batch``; ``benchmarks/plain_server.py`` with an asyncio queue under uvicorn, so the two
servers differ in the server alone.

The batching policy lives here too, for both queues: a batch is capped by the work it holds,
not by its request count alone (:func:`batch_cost`): at most ``max_batch_images_steps`` images x
steps and at most ``max_batch_size`` requests. It waits up to ``batch_wait_timeout_s`` for
company, but only for as many requests as the last batch held: a lone client is never kept
waiting, and a steady crowd fills each batch without sitting out the whole timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from dataclasses import dataclass
from typing import Any

from fastapi import HTTPException

from infra.config import ServeConfig
from infra.store import SERVING_POINTER, Store
from workers.generator import Generator, Request
from workers.serving.http import Generated
from workers.serving.request import MAX_SEED, GenerateBody, Limits, problem, problems
from workers.serving.swap import RETRY_S, Served, Watch

log = logging.getLogger("fewstep.serve")

POINTER = SERVING_POINTER


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
    generator: Generator | None = None  # what drew it: the served generator, or an adapter's base


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
    adapter: bool = True  # False: an adapter model's base (Served.base)


def batch_cost(tickets: list[Ticket]) -> float:
    """Serve's ``batch_size_fn``: the batch's cost, or the whole budget once it holds as many
    requests as the last batch did (so it stops waiting for company that is not coming)."""
    fill = tickets[0].fill
    cost = sum(ticket.cost for ticket in tickets)
    if cost <= fill.max_requests and len(tickets) >= fill.expected:
        return float(fill.max_requests)
    return cost


class Replica:
    """One replica: a generator in memory, a watcher on the serving pointer; the batch queue is
    :meth:`draw`, supplied by the server."""

    def __init__(
        self,
        store_uri: str,
        limits: Limits,
        max_batch_size: int,
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

    def __del__(self) -> None:
        """Serve's graceful shutdown calls this on the replica's event loop: stop watching the store
        before the loop's thread pool goes, or the next poll fails to schedule."""
        watcher = getattr(self, "watcher", None)
        if watcher is not None and not watcher.done():
            try:
                watcher.cancel()
            except RuntimeError:  # garbage-collected after its loop closed: nothing left to stop
                pass

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

    async def draw(self, ticket: Ticket) -> Drawn | Exception:
        """The batch queue: gather ``ticket`` into a batch by :func:`batch_cost`, run it with
        :meth:`draw_batch`, return this ticket's share. The server supplies it."""
        raise NotImplementedError

    async def draw_batch(self, tickets: list[Ticket]) -> list[Drawn | Exception]:
        """One forward pass per step for each (steps, sampler, guidance) group of the batch.

        Requests name no sampler: the batch draws with the sampler the served model is served with
        (a swap between validation and drawing changes the model, never fails the request)."""
        served = self.served  # the whole batch runs on the model it started with
        self.fill.expected = len(tickets)
        out: list[Drawn | Exception | None] = [None] * len(tickets)
        requests: list[Request | None] = [None] * len(tickets)
        generators = {True: (served.generator, served.sampler), False: (served.base, served.base_sampler)}
        groups: dict[tuple, list[int]] = {}
        for i, ticket in enumerate(tickets):
            generator, sampler = generators[ticket.adapter]
            try:
                if generator is None:  # the model changed since validation to one without an adapter
                    raise ValueError(f"{served.ref} has no adapter to switch off: leave adapter out")
                requests[i] = dataclasses.replace(ticket.request, sampler=sampler)
                generator.labels_for(requests[i])  # the model may have changed since validation
                generator.sampler(sampler)
            except ValueError as error:
                out[i] = error
                continue
            groups.setdefault((ticket.adapter, requests[i].group), []).append(i)
        for (adapter, _), indices in groups.items():
            try:
                images = await asyncio.to_thread(generators[adapter][0].generate_many, [requests[i] for i in indices])
            except Exception as error:  # noqa: BLE001 - fail this group's requests only
                log.exception("generation failed for %d request(s)", len(indices))
                images = [error] * len(indices)
            for i, result in zip(indices, images):
                out[i] = (
                    result
                    if isinstance(result, Exception)
                    else Drawn(
                        served,
                        requests[i].sampler,
                        result.pixels,
                        result.nfe,
                        result.seconds,
                        len(indices),
                        generators[adapter][0],
                    )
                )
        return out

    # -- what the routes do -------------------------------------------------------------------

    async def generate(self, body: GenerateBody) -> Generated:
        served = self.served
        found = problems(body, self.limits, served.generator.num_classes)
        adapter = body.adapter is not False
        if not adapter and served.base is None:
            found.append(problem("adapter", f"the served model {served.ref} is not an adapter: leave adapter out"))
        if found:
            raise HTTPException(status_code=422, detail=found)
        generator = served.generator if adapter else served.base
        sampler = generator.sampler(served.sampler if adapter else served.base_sampler)
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
        drawn = await self.draw(Ticket(request, self.fill.cost(request), self.fill, adapter))
        if isinstance(drawn, ValueError):
            raise HTTPException(status_code=422, detail=[problem("labels", str(drawn))])
        if isinstance(drawn, Exception):
            raise HTTPException(status_code=500, detail=f"generation failed: {type(drawn).__name__}: {drawn}")
        generator = drawn.generator or drawn.served.generator
        guided = generator.sampler(drawn.sampler).guided
        return Generated(
            model=generator.ref,
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
