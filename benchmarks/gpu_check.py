"""The GPU check: the quick pipeline, bf16 training throughput and MFU, Serve throughput, on one GPU.

    bash benchmarks/gpu_check.sh [--short] [--out DIR]      (under 8 minutes on one H100/H200)

Four parts, each printing ``== name`` and its figures, then one JSON object last:

1. ``matmul``: the bf16 matmul rate this GPU reaches (8192^3 matmuls), the denominator of MFU.
2. ``train``: the one training loop (``workers.train.fit``, a Ray Train worker holding the GPU,
   bf16 autocast) on a DiT-B/2 over 32x32x4 inputs: samples/s over its steps (timed inside the
   loop, so worker start-up is apart) and MFU = 3 x forward FLOPs per sample x samples/s / matmul rate.
3. ``pipeline``: ``fewstep run --preset quick`` with every stage that trains or samples on the GPU
   (vae, latents, base, pairs, reflow, consistency, features, evaluate); seconds per stage.
4. ``serve``: ``benchmarks/serve_bench.py`` on the pipeline's promoted model, replica on the GPU:
   batched throughput at concurrency 32 and the batched / unbatched ratio.

Without a CUDA device it still runs to the end on the CPU (that is how it is tested): the
GPU-only figures (matmul rate, bf16 training, MFU) print a ``SKIP`` line, and the pipeline and
Serve parts run on the CPU. ``--short`` shrinks everything to a smoke run (the test's mode).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def section(name: str) -> None:
    print(f"\n== {name}", flush=True)


def skip(what: str, why: str) -> None:
    print(f"SKIP {what}: {why}", flush=True)


def matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    """bf16 matmul rate on the current CUDA device, in TFLOP/s (2 n^3 per matmul)."""
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def forward_flops(spec: dict, batch: int, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass of the model in ``spec`` on ``batch`` inputs (torch's flop counter)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from models.registry import build_model

    model = build_model(spec).eval()
    x, t, y = torch.randn(batch, *shape), torch.rand(batch), torch.zeros(batch, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x, t, y)
    return float(counter.get_total_flops())


def train(short: bool, peak_tflops: float | None) -> dict:
    """bf16 samples/s and MFU of the training loop on one GPU worker."""
    import numpy as np
    import ray

    from infra.config import GeneratorConfig, Resources
    from infra.store import Store
    from models.dit import DiT, dit_config
    from models.objectives import FlowMatching
    from models.registry import model_spec
    from workers.batches import PairBatch
    from workers.runtime import ensure_ray
    from workers.train import TrainJob, fit

    model, side, batch, steps = ("DiT-T/2", 8, 16, 6) if short else ("DiT-B/2", 32, 256, 300)
    shape = (4, side, side)
    rng = np.random.default_rng(0)
    rows = [
        {
            "x_0": rng.standard_normal(shape).astype(np.float32),
            "x_1": rng.standard_normal(shape).astype(np.float32),
            "label": i % 10,
        }
        for i in range(max(4 * batch, 64))
    ]
    spec = model_spec(DiT(dit_config(model, input_size=side, in_channels=4, num_classes=10)))
    gpus = 1.0 if peak_tflops else 0.0
    config = GeneratorConfig(
        model=model,
        steps=steps,
        batch_size=batch,
        warmup_steps=0,
        checkpoint_every=steps,
        resources=Resources(workers=1, cpus=1, gpus=gpus),
    )
    ensure_ray(verbose=False)
    with tempfile.TemporaryDirectory() as folder:
        job = TrainJob(
            store=Store.open(os.path.join(folder, "store")),
            stage="gpucheck",
            key="train",
            model_spec=spec,
            objective=FlowMatching(label_dropout=0.1),
            config=config,
            adapt_batch=PairBatch(num_classes=10),
        )
        started = time.perf_counter()
        result = fit(job, ray.data.from_items(rows), storage_path=os.path.join(folder, "ray"))
        wall = time.perf_counter() - started
    steps_s = result.timing.get("steps_s") or wall
    samples_per_s = steps * batch / steps_s
    flops = 3 * forward_flops(spec, 1, shape)  # forward + backward ~ 3 x forward, per sample
    out = {
        "model": model,
        "batch": batch,
        "steps": steps,
        "device": "cuda" if gpus else "cpu",
        "samples_per_s": round(samples_per_s, 1),
        "stage_s": round(wall, 2),
        "timing": result.timing,
        "train_flops_per_sample": flops,
    }
    print(
        f"{model} on {shape}, batch {batch}, {steps} steps on {out['device']}: {samples_per_s:.1f} samples/s "
        f"(stage {wall:.1f} s; {', '.join(f'{k} {v:.2f}' for k, v in result.timing.items())})"
    )
    if peak_tflops:
        out["achieved_tflops"] = round(flops * samples_per_s / 1e12, 2)
        out["mfu"] = round(out["achieved_tflops"] / peak_tflops, 4)
        print(f"achieved {out['achieved_tflops']} TFLOP/s = MFU {out['mfu']:.1%} of the measured bf16 matmul rate")
    else:
        skip("bf16 training MFU", "no CUDA device; the loop ran in fp32 on the CPU")
    return out


def pipeline_config(short: bool, gpu: bool) -> str:
    """A YAML on the quick preset: the GPU for every stage that trains or samples; tiny with --short."""
    import yaml

    # On the GPU every stage gets a worker with one (the quick preset trains in local mode, on the CPU).
    gpus = {"resources": {"gpus": 1, "workers": 1}} if gpu else {}
    data: dict = {
        name: dict(gpus)
        for name in ("vae", "latents", "base", "pairs", "reflow", "consistency", "features", "evaluate")
    }
    if short:
        tiny = {"steps": 4, "batch_size": 16, "checkpoint_every": 4, "warmup_steps": 0}
        data["ingest"] = {"limit": 96}
        for name in ("vae", "base", "reflow", "consistency", "features"):
            data[name].update(tiny)
        data["vae"].update(measure_images=16)
        data["consistency"].update(intervals=2)
        data["pairs"].update(pairs=32, steps=2, batch_size=16)
        data["latents"].update(batch_size=32)
        data["evaluate"].update(n=16, flow_steps=[1], flow_solvers=["euler"], consistency_steps=[1])
    # A speed check, not a quality one: the promoted model is what the serve check measures, so the
    # absolute "has it learned?" bar is off (minutes of CPU or GPU training do not pass it).
    data["serve"] = {"min_accuracy_over_chance": 0.0, "max_excess_over_ceiling": None}
    handle, path = tempfile.mkstemp(suffix=".yaml")
    os.write(handle, yaml.safe_dump(data).encode())
    os.close(handle)
    return path


def pipeline(short: bool, gpu: bool, store: str) -> dict:
    """``fewstep run --preset quick`` on the GPU; seconds per stage from the manifests."""
    from infra.store import Store

    config = pipeline_config(short, gpu)
    started = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flows.cli import main; main()",
            "run",
            "--preset",
            "quick",
            "--config",
            config,
            "--store",
            store,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"fewstep run failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    stages: dict[str, float] = {}
    for manifest in Store.open(store).list_manifests():
        stages[manifest.stage] = stages.get(manifest.stage, 0.0) + float(manifest.metrics.get("seconds", 0.0))
    print(f"fewstep run --preset quick{' (short)' if short else ''} on {'the GPU' if gpu else 'the CPU'}: {wall:.1f} s")
    print("  " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))
    return {"wall_s": round(wall, 2), "stage_s": {k: round(v, 2) for k, v in stages.items()}}


def serve(short: bool, gpu: bool, store: str) -> dict:
    """serve_bench.py on the promoted model: batched throughput and the batched / unbatched ratio."""
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "serve_bench.py"),
        "--store",
        store,
        "--answers",
        "raw",
        "--seconds",
        "1" if short else "5",
        "--json",
        "--device",
        "cuda" if gpu else "cpu",
        "--images",
        "1" if short else "4",
        "--steps",
        "1",
        *(["--model-bound", "DiT-T/2@4"] if short else []),  # the smoke run: every part, a tiny model
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"serve_bench failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    figures = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
    batched = next(r for r in figures["rows"] if r["mode"] == "Serve batched" and r["concurrency"] == 32)
    print(
        f"Serve batched at concurrency 32: {batched['images_per_s']:.1f} images/s, "
        f"{batched['per_pass']:.1f} requests per forward pass; batched / unbatched "
        f"{figures.get('batched_over_unbatched_c32')}, Serve / in-process {figures.get('serve_over_inprocess_c32')}, "
        f"Serve / plain uvicorn {figures.get('serve_over_plain_c32')}; model-bound batched / unbatched "
        f"{figures.get('model_bound_batched_over_unbatched_c32')}"
    )
    return {"batched_images_per_s_c32": batched["images_per_s"], **{k: v for k, v in figures.items() if k != "rows"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", action="store_true", help="a smoke run (tiny sizes), e.g. on a CPU in the tests")
    parser.add_argument("--out", default=None, help="keep the store here (default: a temp folder)")
    args = parser.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(0) if gpu else "cpu", "short": args.short}
    print(f"device: {report['device']}; torch {torch.__version__}")

    section("matmul")
    peak = None
    if gpu:
        peak = matmul_tflops(4096 if args.short else 8192, 5 if args.short else 20)
        report["bf16_matmul_tflops"] = round(peak, 1)
        print(f"bf16 matmul: {peak:.1f} TFLOP/s")
    else:
        skip("bf16 matmul rate", "no CUDA device")

    section("train")
    report["train"] = train(args.short, peak)

    store = args.out or os.path.join(tempfile.mkdtemp(prefix="fewstep-gpu-check-"), "store")
    section("pipeline")
    report["pipeline"] = pipeline(args.short, gpu, store)

    section("serve")
    report["serve"] = serve(args.short, gpu, store)

    report["seconds"] = round(time.perf_counter() - started, 1)
    section(f"done in {report['seconds']} s")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
