"""The server a user would write instead of Ray Serve: one process, FastAPI on uvicorn, an asyncio batch queue.

    python benchmarks/plain_server.py --store URI --model REF --port PORT
                                      [--max-batch-size 32] [--batch-wait-ms 5] [--threads 1] [--device cpu]

``serve_bench.py`` starts it in a subprocess as its contender. Everything but the server is
fewstep's own: the routes, body limit and encodings (:func:`workers.serving.http.make_api`), the
request checks, batch policy, drawing and answer (:class:`workers.serving.replica.Replica`), the
model load and sanity batch (:mod:`workers.serving.swap`). What differs from the Serve app:

- no HTTP proxy, router or actor hop: uvicorn calls the replica's routes in this process;
- the batch queue is :class:`MicroBatcher`, an asyncio queue that forms batches by the same rule
  as ``@serve.batch`` with the same ``batch_size_fn`` (:func:`~workers.serving.replica.batch_cost`):
  after a batch's first request it takes arrivals for up to ``batch_wait_timeout_s``, until the
  batch's cost reaches ``max_batch_size``; one batch draws at a time while the next one gathers.

uvicorn runs with its defaults (its access log on, as Serve's is), logging to stderr. It
prints ``READY <url>`` on stdout once the model is loaded and the socket listens.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class MicroBatcher:
    """Requests in, batches out: ``handle(batch) -> one result per item`` runs one batch at a time.

    The batching rule of Ray Serve's ``_BatchQueue.wait_for_batch`` (Ray 2.60): a batch starts with
    the oldest waiting item; arrivals join while ``size(batch)`` stays within ``max_size`` (the first
    that would overflow waits for the next batch); the batch closes when its size reaches
    ``max_size`` or ``wait_s`` after its first item. The next batch gathers while one draws.
    """

    def __init__(
        self,
        handle: Callable[[list], Awaitable[list]],
        max_size: int,
        wait_s: float,
        size: Callable[[list], float] = len,
    ):
        self.handle, self.max_size, self.wait_s, self.size = handle, max_size, wait_s, size
        self.pending: collections.deque[tuple[Any, asyncio.Future]] = collections.deque()
        self.arrived = asyncio.Event()
        self.drawing = asyncio.Semaphore(1)  # Serve's max_concurrent_batches=1
        self.loop: asyncio.Task | None = None
        self.running: set[asyncio.Task] = set()

    async def submit(self, item: Any) -> Any:
        if self.loop is None:
            self.loop = asyncio.get_running_loop().create_task(self.batches())
        future = asyncio.get_running_loop().create_future()
        self.pending.append((item, future))
        self.arrived.set()
        return await future

    async def next_batch(self) -> list[tuple[Any, asyncio.Future]]:
        while not self.pending:
            self.arrived.clear()
            await self.arrived.wait()
        loop = asyncio.get_running_loop()
        batch = [self.pending.popleft()]
        deadline = loop.time() + self.wait_s
        while True:
            while self.pending:
                if self.size([item for item, _ in [*batch, self.pending[0]]]) > self.max_size:
                    return batch  # full: the next arrival starts the next batch
                batch.append(self.pending.popleft())
            remaining = deadline - loop.time()
            if self.size([item for item, _ in batch]) >= self.max_size or remaining <= 0:
                return batch
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), remaining)
            except TimeoutError:
                pass

    async def batches(self) -> None:
        while True:
            batch = await self.next_batch()
            task = asyncio.get_running_loop().create_task(self.draw(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def draw(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        async with self.drawing:
            try:
                results = await self.handle([item for item, _ in batch])
            except Exception as error:  # noqa: BLE001 - fail this batch's requests, keep serving
                results = [error] * len(batch)
            for (_, future), result in zip(batch, results):
                if not future.done():
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)


def plain_replica(store_uri: str, config, max_batch_size: int):
    """A :class:`~workers.serving.replica.Replica` whose batch queue is a :class:`MicroBatcher`."""
    from workers.serving.replica import POINTER, Replica, batch_cost
    from workers.serving.request import Limits

    class PlainReplica(Replica):
        """The Serve deployment's replica with an asyncio queue where ``@serve.batch`` was."""

        def __init__(self) -> None:
            super().__init__(
                store_uri,
                Limits.from_config(config),
                max_batch_size,
                config.poll_s,
                POINTER,
                retry_s=config.swap_retry_s,
                max_batch_images_steps=config.max_batch_images_steps,
            )
            self.queue = MicroBatcher(self.draw_batch, max_batch_size, config.batch_wait_timeout_s, batch_cost)

        async def draw(self, ticket):
            return await self.queue.submit(ticket)

    return PlainReplica()


async def serve_forever(args: argparse.Namespace) -> None:
    import uvicorn

    from infra.config import Resources, ServeConfig
    from workers.serving.http import make_api

    cap = {"max_batch_images_steps": args.max_batch_images_steps} if args.max_batch_images_steps else {}
    config = ServeConfig(
        max_batch_size=args.max_batch_size,
        batch_wait_timeout_s=args.batch_wait_ms / 1000,
        max_ongoing_requests=max(64, args.max_batch_size),
        max_n=args.max_n,
        steps=args.steps,
        resources=Resources(cpus=args.threads),
        **cap,
    )
    replica = plain_replica(args.store, config, args.max_batch_size)
    await replica.reconfigure({"model": args.model})  # load, verify, sanity batch; as a Serve replica does
    app = make_api(replica, config.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.port, log_config=None))
    started = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if started.done():
            started.result()  # raises what stopped uvicorn (e.g. the port is taken)
            raise RuntimeError("uvicorn stopped before it listened")
        await asyncio.sleep(0.05)
    print(f"READY http://127.0.0.1:{args.port}/", flush=True)
    await started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--model", required=True, help="the ref to serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-batch-images-steps", type=int, default=0, help="0: the config's default")
    parser.add_argument("--max-n", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1, help="the served steps (a request may name its own)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a Serve replica's num_cpus)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    args = parser.parse_args()

    if args.device == "cpu":  # the Generator picks cuda when present; a CPU run hides it
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s -- %(message)s")
    torch.set_num_threads(args.threads)
    asyncio.run(serve_forever(args))


if __name__ == "__main__":
    main()
