"""How OpenMP's waiting threads should wait: spin, spin a little, or sleep — alone and contended.

    python benchmarks/threads_bench.py [--steps 150] [--threads 2] [--json]

A torch worker with several threads ends every parallel op with its threads waiting for the
next one. libgomp (what PyTorch's Linux wheels use) spins ~300,000 times before sleeping;
``GOMP_SPINCOUNT`` bounds the spin and ``OMP_WAIT_POLICY=PASSIVE`` sleeps at once. Spinning is
fastest on cores nobody else wants and ruinous when two such workers share the cores (each
spins on the core the other needs). ``workers.runtime.worker_env`` picks one of these for
every multi-threaded Ray worker; this script measures them side by side in one run.

Each contender trains DiT-T/2 (8x8x4 inputs, batch 64, AdamW) for ``--steps`` steps in a fresh
process with ``--threads`` torch threads: once **alone**, once as **two processes at the same
time** (what a training worker meets when Ray Data, a Serve replica or another job shares
its node). It prints steps/s, and each contender's rate over the default spin's, alone and
contended. ``--json`` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CONTENDERS = {
    "default spin": {},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}

WORKER = """
import sys, time, torch
sys.path.insert(0, {root!r})
from models.dit import DiT, dit_config
torch.set_num_threads({threads})
torch.manual_seed(0)
net = DiT(dit_config("DiT-T/2", input_size=8, in_channels=4, num_classes=10))
opt = torch.optim.AdamW(net.parameters(), 1e-4)
x, t, y = torch.randn(64, 4, 8, 8), torch.rand(64), torch.randint(0, 10, (64,))
def step():
    loss = (net(x, t, y) - x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
for _ in range(10):
    step()
started = time.perf_counter()
for _ in range({steps}):
    step()
print({steps} / (time.perf_counter() - started))
"""


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    return {**env, **extra}


def rates(extra: dict[str, str], copies: int, steps: int, threads: int) -> list[float]:
    """steps/s of ``copies`` workers started together with ``extra`` in their environment."""
    code = WORKER.format(root=str(ROOT), steps=steps, threads=threads)
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=clean_env(extra), stdout=subprocess.PIPE, text=True)
        for _ in range(copies)
    ]
    out = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a worker failed: {[p.returncode for p in procs]}")
    return [float(text.strip().splitlines()[-1]) for text in out]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    results = {}
    for name, extra in CONTENDERS.items():
        alone = rates(extra, 1, args.steps, args.threads)[0]
        together = rates(extra, 2, args.steps, args.threads)
        results[name] = {"alone": round(alone, 1), "contended_each": round(sum(together) / 2, 1)}
        print(
            f"{name:26s} alone {alone:6.1f} steps/s   two at once {together[0]:6.1f} + {together[1]:6.1f}", flush=True
        )
    base = results["default spin"]
    print(f"\n{args.threads} torch threads per worker, {os.cpu_count()} cores; rate over the default spin's:")
    for name, r in results.items():
        r["alone_over_default"] = round(r["alone"] / base["alone"], 2)
        r["contended_over_default"] = round(r["contended_each"] / base["contended_each"], 2)
        print(f"  {name:26s} alone {r['alone_over_default']:5.2f}x   contended {r['contended_over_default']:5.2f}x")
    if args.json:
        print(
            json.dumps({"steps": args.steps, "threads": args.threads, "cores": os.cpu_count(), "contenders": results})
        )


if __name__ == "__main__":
    main()
