"""Drill: Serve under load with mixed valid and invalid bodies, then a replica killed under load.

    python -m drills.drill_serve_load [--requests 2000] [--concurrency 32] [--invalid 0.3]
                                          [--replicas 2] [--kill-requests 2000] [--json]

Starts the real app (workers.serving.app.start, what ``fewstep serve`` runs) on a tiny
synthetic store, on 127.0.0.1, and drives it from a separate process
(drills/serve_load_client.py: asyncio + httpx, ``--concurrency`` requests in flight).

1. load: ``--requests`` requests, a fraction ``--invalid`` of them invalid (malformed JSON,
   wrong types, out-of-range values, oversized bodies). Figures: counts per status for valid
   and invalid bodies, latency percentiles of the valid ones, throughput. Expected: every
   valid body 200, every invalid one 4xx, no 5xx at all.
2. kill: another ``--kill-requests`` valid requests; once a quarter of them are answered, one
   replica is killed (``ray.kill``, as a crashed process). Figures: valid requests that failed,
   by status; the time from the kill to the first 200 of a request sent after it; the time
   until Serve reports every replica running again; and whether anything failed after that.

``--json`` prints one JSON object with every figure as the last line.
"""

from __future__ import annotations

import argparse
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from drills import kit


def load_drill(
    url: str, workdir: Path, requests: int, concurrency: int = 32, invalid: float = 0.3, seed: int = 0
) -> kit.LoadFigures:
    load = kit.Load(url, workdir / "load.jsonl", requests, concurrency, invalid, seed).start()
    return kit.load_figures(load.wait())


@dataclass(frozen=True)
class KillFigures:
    requests: int
    replicas: int
    killed: str
    killed_after_requests: int
    failed: int  # valid requests that did not get a 200
    failed_status: dict[str, int]  # status (0 = no answer) -> count
    first_ok_after_kill_s: float  # kill -> the first 200 answer to a request sent after the kill
    replicas_back_s: float  # kill -> Serve reports every replica RUNNING again (a new one in place)
    failed_after_recovery: int  # valid requests sent after replicas_back_s that did not get a 200
    p50_ms: float
    p99_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def kill_drill(
    url: str, workdir: Path, requests: int, replicas: int, concurrency: int = 32, seed: int = 1, timeout_s: float = 240
) -> KillFigures:
    """Valid requests only, so that every failure is the kill's."""
    before = set(kit.replica_names())
    assert len(before) == replicas, f"expected {replicas} replicas, Serve has {sorted(before)}"
    load = kit.Load(url, workdir / "kill.jsonl", requests, concurrency, invalid=0.0, seed=seed).start()
    after = max(1, requests // 4)
    kit.wait_for(lambda: load.done() >= after or load.process.poll() is not None, timeout_s, f"{after} answers")
    killed_after = load.done()
    killed_at = time.time()
    killed = kit.kill_replica()
    kit.wait_for(
        lambda: (
            kit.replicas() == replicas
            and killed not in kit.replica_names()
            and len(set(kit.replica_names()) - before) == 1
        ),
        timeout_s,
        "Serve to replace the killed replica",
        poll_s=0.1,
    )
    back_at = time.time()
    records = load.wait(timeout_s)
    failed = [r for r in records if r["status"] != 200]
    ok_after = [r["end"] for r in records if r["status"] == 200 and r["start"] > killed_at]
    figures = kit.load_figures(records)
    return KillFigures(
        requests=len(records),
        replicas=replicas,
        killed=killed,
        killed_after_requests=killed_after,
        failed=len(failed),
        failed_status=dict(sorted(Counter(str(r["status"]) for r in failed).items())),
        first_ok_after_kill_s=round(min(ok_after) - killed_at, 3) if ok_after else float("nan"),
        replicas_back_s=round(back_at - killed_at, 2),
        failed_after_recovery=sum(r["start"] > back_at for r in failed),
        p50_ms=figures.p50_ms,
        p99_ms=figures.p99_ms,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--invalid", type=float, default=0.3)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--kill-requests", type=int, default=2000)
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON object, last")
    args = parser.parse_args()

    with kit.serving_tiny_store(args.replicas) as (url, tiny, workdir):
        load = load_drill(url, workdir, args.requests, args.concurrency, args.invalid)
        print(
            f"load: {load.requests} requests ({load.valid} valid, {load.invalid} invalid) at concurrency "
            f"{args.concurrency} in {load.seconds}s = {load.requests_per_s}/s",
            flush=True,
        )
        print(f"  valid: {load.valid_status}   invalid: {load.invalid_status}", flush=True)
        print(
            f"  5xx: valid {load.valid_5xx}, invalid {load.invalid_5xx}; latency of valid 200s: "
            f"p50 {load.p50_ms} ms, p95 {load.p95_ms} ms, p99 {load.p99_ms} ms",
            flush=True,
        )
        kill = kill_drill(url, workdir, args.kill_requests, args.replicas, args.concurrency)
        print(
            f"kill: 1 of {kill.replicas} replica(s) killed after {kill.killed_after_requests} of {kill.requests} "
            f"requests: {kill.failed} failed {kill.failed_status}; first 200 after the kill in "
            f"{kill.first_ok_after_kill_s}s; all replicas running again after {kill.replicas_back_s}s; "
            f"{kill.failed_after_recovery} failed after that",
            flush=True,
        )
    if args.json:
        kit.print_json_last(
            {"load": load.as_dict(), "kill": kill.as_dict(), "concurrency": args.concurrency, "cores": os.cpu_count()}
        )


if __name__ == "__main__":
    main()
