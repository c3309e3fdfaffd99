"""Where a served request's time goes: CPU per process, then py-spy inside the proxy and replica.

    python benchmarks/serve_profile.py [--seconds 8] [--concurrency 32] [--answer raw] [--batch 32] [--json]

Deploys the synthetic generator of ``serve_bench.py`` and loads it with ``wrk`` (pinned to the
last core) at one concurrency, twice:

1. **CPU by process.** Each process's user + system CPU over the load (read from ``/proc``),
   divided by the requests served: ms of CPU per request for the Serve replica, the HTTP
   proxy, the Serve controller, raylet, GCS, the load generator and everything else. On a
   2-core machine these add up to what one request costs the box.
2. **Inside the proxy and the replica.** ``py-spy record`` samples both (non-blocking, 97 Hz)
   during a second load of the same length; every sampled stack is put in the first bucket
   that any of its frames matches (model forward, image encoding, request parsing and
   validation, HTTP server, Ray Serve routing and batching, Ray core RPC and serialization,
   the asyncio loop itself), and the shares of the busy samples are printed.

``--json`` prints one JSON object last: ``cpu_ms_per_request`` by process and ``buckets`` by
process. The profile is a reading aid for BENCHMARKS.md, not a figure to compare run to run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import serve_bench  # noqa: E402 - beside this file

# (bucket, pattern on one frame "function (file:line)"); the first bucket any frame matches wins.
BUCKETS = (
    ("model forward", re.compile(r"models/|torch/nn/|generate_many|workers/generator\.py")),
    ("image encoding", re.compile(r"png|zlib|b64|base64|encode_images|tobytes")),
    ("request parsing, validation", re.compile(r"pydantic|workers/serving/request\.py|json/decoder|orjson|loads")),
    ("HTTP server (uvicorn, starlette, FastAPI)", re.compile(r"uvicorn|starlette|fastapi|h11|httptools")),
    ("Ray Serve routing, batching", re.compile(r"ray/serve/")),
    ("Ray core RPC, serialization", re.compile(r"ray/_private|ray/_raylet|_raylet|pickle|grpc|serialization")),
    ("asyncio loop", re.compile(r"asyncio/")),
)


def processes() -> dict[int, tuple[str, float]]:
    """Every process's (role in serving, user + system CPU seconds), read from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            line = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:  # gone between listing and reading
            continue
        found[int(entry.name)] = (role_of(int(entry.name), line), (int(fields[11]) + int(fields[12])) / tick)
    return found


def role_of(pid: int, line: str) -> str:
    """A process's part in serving, from its command line."""
    for marker, role in (("ServeReplica", "Serve replica"), ("ProxyActor", "HTTP proxy")):
        if marker in line:
            return role
    if "ServeController" in line:
        return "Serve controller"
    program = line.split(" ")[0].rsplit("/", 1)[-1]
    if program in ("raylet", "gcs_server", "wrk", "py-spy"):
        return program
    return "benchmark driver" if pid == os.getpid() else "other"


def cpu_by_role(before: dict, after: dict) -> dict[str, float]:
    used: Counter = Counter()
    for pid, (role, seconds) in after.items():
        used[role] += seconds - before.get(pid, (role, 0.0))[1]
    return dict(used)


def load(url: str, script: str, concurrency: int, seconds: int, args: list[str]) -> dict:
    """One wrk run: its figures, with its own CPU seconds as ``client_cpu_s`` (it has exited by
    the time /proc is read again)."""
    out, cpu = serve_bench.run_client(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", script, url, "--", *args]
    )
    return {**json.loads(next(text for text in out.splitlines() if text.startswith("WRK "))[4:]), "client_cpu_s": cpu}


# A sample whose innermost Python frame is one of these is a thread parked in C (a thread
# pool's worker on its queue, a Ray or asyncio thread in its native loop, a thread with no
# Python frames at all) that py-spy's idle heuristic did not recognise: set aside, not busy.
PARKED = re.compile(r"^(Thread\.run|_worker|Condition\.wait|Event\.wait|)( \(|$)")


def buckets_of(raw: Path) -> dict[str, float]:
    """Shares of the busy samples in a ``py-spy --format raw`` file, by bucket, and
    ``parked``: the share of all samples set aside as parked threads."""
    counts: Counter = Counter()
    parked = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        if PARKED.match(frames[-1].strip()) or (len(frames) == 1 and frames[0].startswith("thread")):
            parked += int(count)
            continue
        bucket = next((name for name, pattern in BUCKETS if any(pattern.search(f) for f in frames)), "other")
        counts[bucket] += int(count)
    busy = sum(counts.values()) or 1
    shares = {name: round(counts[name] / busy, 3) for name, _ in (*BUCKETS, ("other", None)) if counts[name]}
    return {**shares, "parked": round(parked / max(1, parked + busy), 3)}


def serve_pids() -> dict[str, int]:
    return {role: pid for pid, (role, _) in processes().items() if role in ("Serve replica", "HTTP proxy")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--answer", choices=sorted(serve_bench.ACCEPT), default="raw")
    parser.add_argument("--batch", type=int, default=32, help="max_batch_size of the deployment")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not shutil.which("wrk") or not shutil.which("py-spy"):
        raise SystemExit("serve_profile needs wrk (apt install wrk) and py-spy (pip install py-spy) on PATH")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    from workers.runtime import ensure_ray
    from workers.serving import app as serve_app

    store, ref = serve_bench.synthetic_store(tempfile.mkdtemp(prefix="fewstep-profile-"))
    config = serve_bench.bench_config(args.batch, 5.0, 1, args.steps, 1.0, 0.0)
    ensure_ray()
    work = Path(tempfile.mkdtemp(prefix="fewstep-spy-"))
    script = work / "load.lua"
    script.write_text(serve_bench.WRK_SCRIPT)
    wrk_args = ["1", str(args.steps), "10", serve_bench.ACCEPT[args.answer]]
    try:
        url = serve_app.start(store.uri, config, ref, host="127.0.0.1", port=serve_bench.free_port())
        load(url, str(script), args.concurrency, 2, wrk_args)  # warm up
        before = processes()
        got = load(url, str(script), args.concurrency, args.seconds, wrk_args)
        used = {**cpu_by_role(before, processes()), "wrk (load generator)": got["client_cpu_s"]}
        n = max(1, got["requests"])
        cpu_ms = {role: round(1000 * s / n, 2) for role, s in sorted(used.items(), key=lambda kv: -kv[1])}

        spies = {}
        for role, pid in serve_pids().items():
            out = work / f"{role.replace(' ', '_')}.txt"
            command = ["py-spy", "record", "--pid", str(pid), "--duration", str(args.seconds), "--rate", "97"]
            command += ["--nonblocking", "--format", "raw", "--output", str(out)]
            spies[role] = (subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
        time.sleep(0.5)
        load(url, str(script), args.concurrency, args.seconds, wrk_args)
        buckets = {}
        for role, (spy, out) in spies.items():
            spy.wait(timeout=60)
            buckets[role] = buckets_of(out) if out.exists() else {}
    finally:
        serve_app.stop()

    rate = got["requests"] / got["seconds"]
    print(
        f"{args.answer} answers, concurrency {args.concurrency}, max_batch_size {args.batch}, {args.steps} steps: "
        f"{rate:.1f} requests/s, p50 {got['p50_us'] / 1000:.1f} ms, "
        f"{got['requests'] / max(got['inverse'], 1e-9):.2f} requests per forward pass"
    )
    print("\nCPU per request, by process (ms):")
    for role, ms in cpu_ms.items():
        print(f"  {role:20s} {ms:8.2f}")
    print(f"  {'all':20s} {sum(cpu_ms.values()):8.2f}")
    for role, shares in buckets.items():
        print(f"\n{role}: share of busy samples")
        for name, share in shares.items():
            if name != "parked":
                print(f"  {name:45s} {100 * share:5.1f}%")
        print(f"  ({100 * shares.get('parked', 0):.0f}% of all samples were parked threads, set aside)")
    if args.json:
        print(
            json.dumps(
                {
                    "answer": args.answer,
                    "concurrency": args.concurrency,
                    "max_batch_size": args.batch,
                    "requests_per_s": round(rate, 1),
                    "p50_ms": round(got["p50_us"] / 1000, 2),
                    "cpu_ms_per_request": cpu_ms,
                    "buckets": buckets,
                }
            )
        )


if __name__ == "__main__":
    main()
