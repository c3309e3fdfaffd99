"""Drill: hot swaps to broken models under load; the old model keeps serving, /healthz says why.

    python -m drills.drill_serve_swap [--replicas 2] [--concurrency 32] [--hold-s 3] [--json]

Starts the real app on a tiny synthetic store, following its ``serving/current`` pointer,
and drives it from a separate process (valid requests only, ``--concurrency`` in flight).
Under that load the pointer is moved, in turn, to

    corrupt     a good model with one byte of its weights file flipped (IntegrityError)
    nan         a model with NaN weights
    overflow    finite weights whose output overflows (only the sanity batch catches it)

holding each for ``--hold-s`` seconds, then to a good model. Figures: requests and how many
failed; for each broken model the seconds until /healthz reported it (``degraded``, with
the reason) and the attempts made to load it (1: no retry per poll); which model drew every
answer while the pointer named a broken one (expected: only the old one); the seconds until
the good model served, and /healthz after it.

``--json`` prints one JSON object with every figure as the last line.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drills import kit
from infra.store import SERVING_POINTER


@dataclass(frozen=True)
class BadSwap:
    kind: str
    ref: str
    detected_s: float  # pointer moved -> /healthz reports the failed swap
    attempts: int  # loads of this ref over the hold (1 = not retried each poll)
    error: str  # the reason /healthz gave


@dataclass(frozen=True)
class SwapFigures:
    requests: int
    failed: int  # requests that did not get a 200
    old: str
    new: str
    bad: list[BadSwap]
    models_while_bad: dict[str, int]  # which model drew the answers sent while the pointer named a broken model
    swap_s: float  # pointer moved to the good model -> /healthz reports it served and ok
    health_after: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def swap_drill(
    url: str, tiny: kit.TinyStore, workdir: Path, concurrency: int = 32, hold_s: float = 3.0, timeout_s: float = 120
) -> SwapFigures:
    """``tiny``'s pointer must name ``tiny.first``, the model the app serves; it ends on ``tiny.second``."""
    store = tiny.store
    assert kit.health(url) == {"status": "ok", "model": tiny.first.ref, "reasons": [], "failed_swap": None}
    load = kit.Load(url, workdir / "swap.jsonl", requests=1_000_000, concurrency=concurrency, invalid=0.0).start()
    bad: list[BadSwap] = []
    try:
        kit.wait_for(lambda: load.done() >= 20 or load.process.poll() is not None, timeout_s, "the load to start")
        bad_from = time.time()
        for kind, manifest in (("corrupt", tiny.corrupt), ("nan", tiny.nan), ("overflow", tiny.overflow)):
            moved = time.monotonic()
            store.put_pointer(SERVING_POINTER, manifest.ref)

            def reported(manifest=manifest):
                health = kit.health(url)
                failed = health["failed_swap"]
                return health if failed and failed["ref"] == manifest.ref else None

            health = kit.wait_for(reported, timeout_s, f"/healthz to report {manifest.ref}")
            detected = time.monotonic() - moved
            assert health["status"] == "degraded" and health["model"] == tiny.first.ref, health
            time.sleep(hold_s)
            held = kit.health(url)["failed_swap"]
            bad.append(BadSwap(kind, manifest.ref, round(detected, 2), held["attempts"], held["error"][:160]))
        bad_until = time.time()
        moved = time.monotonic()
        store.put_pointer(SERVING_POINTER, tiny.second.ref)
        health = kit.wait_for(
            lambda: (h := kit.health(url))["model"] == tiny.second.ref and h["status"] == "ok" and h,
            timeout_s,
            f"{tiny.second.ref} to be served",
        )
        swap_s = time.monotonic() - moved
        kit.wait_for(
            lambda: any(r["model"] == tiny.second.ref for r in load.records()),
            timeout_s,
            "an answer from the new model",
        )
        time.sleep(1.0)
        health = kit.health(url)
    finally:
        load.stop()
    records = load.wait(timeout_s)
    while_bad = [r for r in records if bad_from <= r["start"] and r["end"] <= bad_until]
    return SwapFigures(
        requests=len(records),
        failed=sum(r["status"] != 200 for r in records),
        old=tiny.first.ref,
        new=tiny.second.ref,
        bad=bad,
        models_while_bad=dict(kit.load_figures(while_bad).models) if while_bad else {},
        swap_s=round(swap_s, 2),
        health_after=health,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--hold-s", type=float, default=3.0, help="seconds the pointer stays on each broken model")
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object, last")
    args = parser.parse_args()

    with kit.serving_tiny_store(args.replicas) as (url, tiny, workdir):
        figures = swap_drill(url, tiny, workdir, args.concurrency, args.hold_s)
    print(f"swap under load: {figures.requests} requests, {figures.failed} failed; old model {figures.old}", flush=True)
    for b in figures.bad:
        print(
            f"  {b.kind:9s} {b.ref}: /healthz degraded after {b.detected_s}s, {b.attempts} load attempt(s) in "
            f"{args.hold_s}s; reason: {b.error}",
            flush=True,
        )
    print(f"  answers while the pointer named a broken model: {figures.models_while_bad}", flush=True)
    print(
        f"  good model {figures.new} served {figures.swap_s}s after the pointer moved; /healthz: "
        f"{figures.health_after['status']}",
        flush=True,
    )
    if args.json:
        kit.print_json_last(
            {
                **figures.as_dict(),
                "replicas": args.replicas,
                "concurrency": args.concurrency,
                "hold_s": args.hold_s,
                "cores": os.cpu_count(),
            }
        )


if __name__ == "__main__":
    main()
