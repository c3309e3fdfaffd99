"""A load generator for the Serve drills, run in its own process: asyncio + httpx over loopback.

    python drills/serve_load_client.py URL --requests 2000 --concurrency 32 --invalid 0.3 \
        --seed 0 --out records.jsonl [--stop-file PATH]

``concurrency`` workers each send their next request when the last one returns, until
``requests`` were sent or the stop file exists. A request is valid or, with probability
``invalid``, the next of :data:`INVALID` in turn (malformed JSON, wrong types, out-of-range
values, an oversized body...). One JSON line per answered request goes to ``--out`` as it lands:
``{"i", "valid", "kind", "start", "end", "status", "model", "error"}`` with wall-clock
times (``time.time()``, comparable across processes); status 0 means no answer (connection
refused, reset or timed out). The limits assumed are the drills' (drills/kit.py:
max_n 4, max_steps 8, max_guidance 5, 3 classes, 4096-byte bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time

import httpx

NUM_CLASSES = 3
MAX_N = 4

INVALID: list[tuple[str, bytes]] = [
    ("malformed JSON", b'{"n": 2,'),
    ("not an object", b"[1, 2]"),
    ("missing n", b"{}"),
    ("n as a string", b'{"n": "2"}'),
    ("n as a float", b'{"n": 1.5}'),
    ("n zero", b'{"n": 0}'),
    ("n too large", b'{"n": 1000}'),
    ("n huge", b'{"n": 100000000000000000000000000}'),
    ("steps zero", b'{"n": 1, "steps": 0}'),
    ("steps too large", b'{"n": 1, "steps": 9}'),
    ("labels too short", b'{"n": 2, "labels": [0]}'),
    ("label out of range", b'{"n": 1, "labels": [4]}'),
    ("negative label", b'{"n": 1, "labels": [-7]}'),
    ("NaN guidance", b'{"n": 1, "guidance": NaN}'),
    ("infinite guidance", b'{"n": 1, "guidance": -Infinity}'),
    ("guidance too large", b'{"n": 1, "guidance": 6}'),
    ("negative seed", b'{"n": 1, "seed": -1}'),
    ("unknown format", b'{"n": 1, "format": "gif"}'),
    ("unknown field", b'{"n": 1, "model": "base/x"}'),
    ("oversized body", b'{"n": 1, "pad": "' + b"x" * 5000 + b'"}'),
    ("not JSON at all", b"\xff\xfe\x00garbage"),
]


def valid_body(rng: random.Random) -> dict:
    n = rng.randint(1, 2)
    body: dict = {"n": n, "seed": rng.randrange(2**31), "format": rng.choice(["png", "array"])}
    if rng.random() < 0.5:
        body["labels"] = [rng.randint(0, NUM_CLASSES) for _ in range(n)]
    if rng.random() < 0.3:
        body["guidance"] = round(rng.uniform(0, 5), 2)
    if rng.random() < 0.3:
        body["steps"] = rng.randint(1, 2)
    return body


async def run(
    url: str, requests: int, concurrency: int, invalid: float, seed: int, out: str, stop_file: str | None
) -> int:
    rng = random.Random(seed)
    plan = []
    for i in range(requests):
        if rng.random() < invalid:  # the invalid kinds in turn, so that a short run meets each of them
            kind, raw = INVALID[sum(not valid for _, valid, _, _ in plan) % len(INVALID)]
            plan.append((i, False, kind, raw))
        else:
            plan.append((i, True, "valid", json.dumps(valid_body(rng)).encode()))
    queue = iter(plan)
    sink = open(out, "w", buffering=1)
    answered = 0

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal answered
        for i, valid, kind, raw in queue:
            if stop_file and os.path.exists(stop_file):
                return
            start = time.time()
            status, model, error = 0, None, None
            try:
                response = await client.post("v1/generate", content=raw, headers={"content-type": "application/json"})
                status = response.status_code
                if status == 200:
                    model = response.json()["model"]
                elif status >= 500:
                    error = response.text[:300]
            except httpx.HTTPError as failure:
                error = f"{type(failure).__name__}: {failure}"[:300]
            record = {
                "i": i,
                "valid": valid,
                "kind": kind,
                "start": start,
                "end": time.time(),
                "status": status,
                "model": model,
                "error": error,
            }
            sink.write(json.dumps(record) + "\n")
            answered += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    sink.close()
    return answered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--invalid", type=float, default=0.3, help="fraction of invalid bodies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="JSON lines, one per answered request")
    parser.add_argument("--stop-file", help="stop sending new requests once this file exists")
    args = parser.parse_args()
    url = args.url if args.url.endswith("/") else args.url + "/"
    answered = asyncio.run(run(url, args.requests, args.concurrency, args.invalid, args.seed, args.out, args.stop_file))
    print(f"{answered} requests answered", file=sys.stderr)


if __name__ == "__main__":
    main()
