"""benchmarks/plain_server.py, serve_bench's contender: its batch queue keeps Serve's rule, and it
answers in the Serve endpoint's format, because it runs the same replica code.

No timing is asserted.
"""

from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plain_server  # noqa: E402
import serve_bench  # noqa: E402


def test_the_batch_queue_fills_by_size_and_closes_on_its_timeout():
    async def scenario() -> tuple[list[list[int]], list[int]]:
        batches: list[list[int]] = []

        async def handle(items: list[int]) -> list[int]:
            batches.append(items)
            await asyncio.sleep(0)
            return [10 * i for i in items]

        queue = plain_server.MicroBatcher(handle, max_size=4, wait_s=0.05)
        first = await asyncio.gather(*(queue.submit(i) for i in range(6)))  # arrive together
        lone = await queue.submit(99)  # alone: the batch closes on its timeout with one item
        return batches, [*first, lone]

    batches, results = asyncio.run(scenario())
    assert batches == [[0, 1, 2, 3], [4, 5], [99]]
    assert results == [0, 10, 20, 30, 40, 50, 990]


def test_a_failed_batch_fails_its_requests_and_the_queue_keeps_serving():
    async def scenario() -> tuple[str, int]:
        async def handle(items: list[int]) -> list:
            if 0 in items:
                raise ValueError("boom")
            return items

        queue = plain_server.MicroBatcher(handle, max_size=1, wait_s=0)
        try:
            await queue.submit(0)
        except ValueError as error:
            failed = str(error)
        return failed, await queue.submit(1)

    assert asyncio.run(scenario()) == ("boom", 1)


def test_the_plain_server_answers_like_the_serve_endpoint(tmp_path):
    store, ref = serve_bench.synthetic_store(str(tmp_path / "store"))
    with serve_bench.plain_server(store.uri, ref, 8, 5.0, 2, 2, 1.0, "cpu") as url:
        with httpx.Client(base_url=url, timeout=120) as client:
            body = {"n": 2, "steps": 2, "seed": 7, "labels": [1, 10]}
            answer = client.post("/v1/generate", json=body)
            assert answer.status_code == 200, answer.text
            got = answer.json()
            assert got["model"] == ref and got["steps"] == 2 and got["seed"] == 7 and got["labels"] == [1, 10]
            assert len(got["images"]) == 2 and base64.b64decode(got["images"][0]).startswith(b"\x89PNG")
            assert got["batch_requests"] >= 1 and got["shape"] == [16, 16, 1]

            raw = client.post("/v1/generate", json=body, headers={"accept": "application/octet-stream"})
            assert raw.status_code == 200 and raw.headers["x-shape"] == "2,16,16,1"
            assert np.frombuffer(raw.content, np.uint8).size == 2 * 16 * 16

            bad = client.post("/v1/generate", json={"n": 2, "labels": [1]})
            assert bad.status_code == 422 and "got 1 labels for n=2" in bad.text
            assert client.get("/healthz").json()["status"] == "ok"
