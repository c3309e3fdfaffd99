"""A capacity plan from measured unit rates: what 1M images cost per stage at 32², 64² and 256².

    python benchmarks/capacity.py [--sizes 32,64,256] [--images 1000000] [--gpus 8] [--cpus 64]
                                  [--gpu-rates rates.json] [--gpu-tflops 100]

1. **Measures** here, on one CPU thread, the unit of work of every stage with the code the stage
   runs: ingest (decode, resize, PNG-encode one image), vae (one training image: VAE forward,
   backward, AdamW step), latents (one VAE encode), base and reflow (one flow-matching training
   image on the DiT), pairs (one teacher ODE solve), consistency (one distillation training
   image: student forward/backward, Heun teacher step, EMA target), evaluate (one generated image
   at one network evaluation, decoded and featurised), serve (one 1-step image, decoded).
   Rates are images per CPU-second (``time.process_time``, so a busy machine slows the wall
   clock, not the figure) and FLOPs per image (``torch.utils.flop_counter``).
2. **Plans** 1M images per resolution on a cluster of ``--gpus`` GPUs and ``--cpus`` CPUs: GPUs
   (or CPU actors for ingest) per stage and hours per stage, from a per-GPU rate that is
   *measured* when ``--gpu-rates`` gives it (``{"<size>": {"<stage>": images_per_s}}``, as
   benchmarks/gpu_check.sh writes) and otherwise *estimated* as FLOPs per image over
   ``--gpu-tflops`` sustained TFLOP/s.

Scaling assumptions (stated in the output too): data-parallel training and actor pools scale
linearly in GPUs (no input bottleneck: latents are small, pairs precomputed); ingest is CPU
work (PNG codecs) and scales in CPU actors; Ray's per-stage overhead (tens of seconds: worker
start, dataset planning) is left out, it is small against hours. The workload per stage
(epochs, pairs, evaluation grid) is the ``WORKLOAD`` table below; the model per resolution is
``SETUPS``.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from infra.config import ConsistencyConfig, EvaluateConfig, PairsConfig
from models.classifier import Classifier, ClassifierConfig
from models.consistency import ConsistencyDistillation
from models.dit import DiT, dit_config
from models.objectives import FlowMatching
from models.paths import time_sampler
from models.samplers import sample_ode
from models.sampling import SAMPLERS, network_passes
from models.vae import VAE, VAEConfig, VAEObjective
from workers.pixels import encode_png, prepare_image

NUM_CLASSES = 10
CHANNELS = 3


@dataclass(frozen=True)
class Setup:
    """The models fewstep would train at one resolution."""

    image_size: int
    downsample: int  # VAE: latents are image_size / downsample on a side
    dit: str  # DiT preset
    batch: int  # images per measured call (small: CPU time per image hardly depends on it)

    @property
    def latent(self) -> int:
        return self.image_size // self.downsample


SETUPS = {
    32: Setup(32, 4, "DiT-S/2", 8),  # 8x8x4 latents, 16 tokens
    64: Setup(64, 4, "DiT-S/2", 4),  # 16x16x4 latents, 64 tokens
    256: Setup(256, 8, "DiT-B/2", 1),  # 32x32x4 latents, 256 tokens (SD-style f=8)
}

PAIRS, CONSISTENCY, EVALUATE = PairsConfig(), ConsistencyConfig(), EvaluateConfig()
EVAL_N = 10_000  # generated images per evaluated (model, sampler, steps) cell at 1M images
# Image-passes per stage, as multiples of the dataset (epochs), for 1M images.
WORKLOAD = {
    "ingest": 1,  # every image once
    "vae": 5,  # epochs
    "latents": 1,  # every image encoded once
    "base": 40,  # epochs
    "pairs": 1,  # one (x_0, x_1) pair per image, teacher ODE: PairsConfig's solver and steps
    "reflow": 20,  # epochs over the pairs, one round
    "consistency": 20,  # epochs
}


# --------------------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Unit:
    """One stage's unit of work at one resolution."""

    images_per_cpu_s: float
    flops_per_image: float  # 0: not FLOP-bound (codec work)


def measure(call: Callable[[], None], images: int, min_cpu_s: float) -> Unit:
    """Images per CPU-second of ``call`` (after one warm-up), and its FLOPs per image."""
    call()
    with FlopCounterMode(display=False) as counter:
        call()
    flops = counter.get_total_flops() / images
    calls, started = 0, time.process_time()
    while calls < 2 or time.process_time() - started < min_cpu_s:
        call()
        calls += 1
    return Unit(calls * images / (time.process_time() - started), flops)


def source_images(size: int, count: int) -> list[bytes]:
    """JPEGs at twice the target size, smooth with detail (a stand-in for photos)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (size // 4, size // 4, CHANNELS), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((2 * size, 2 * size), Image.Resampling.BICUBIC)
        noise = rng.integers(-12, 13, (2 * size, 2 * size, CHANNELS))
        image = Image.fromarray(np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def train_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], after: Callable[[], None] | None = None):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss().backward()
        optimizer.step()
        if after is not None:
            after()

    return step


def measure_resolution(setup: Setup, min_cpu_s: float) -> dict[str, Unit]:
    """Every stage's unit at one resolution."""
    torch.manual_seed(0)
    b, s, h = setup.batch, setup.image_size, setup.latent
    x = torch.rand(b, CHANNELS, s, s) * 2 - 1  # images in [-1, 1]
    z = torch.randn(b, 4, h, h)
    y = torch.randint(0, NUM_CLASSES, (b,))
    units: dict[str, Unit] = {}

    jpegs = source_images(s, 16)

    def ingest() -> None:
        for data in jpegs:
            encode_png(prepare_image(data, s, CHANNELS))

    units["ingest"] = measure(ingest, len(jpegs), min_cpu_s)

    vae = VAE(VAEConfig(in_channels=CHANNELS, latent_channels=4, base_channels=32, downsample=setup.downsample))
    vae_objective = VAEObjective(beta=1e-4)
    units["vae"] = measure(train_step(vae, lambda: vae_objective.loss(vae, {"x_1": x}).loss), b, min_cpu_s)
    vae.eval()

    def encode() -> None:
        with torch.inference_mode():
            vae.encode(x)

    units["latents"] = measure(encode, b, min_cpu_s)

    net = DiT(dit_config(setup.dit, input_size=h, in_channels=4, num_classes=NUM_CLASSES))
    flow = FlowMatching(time_sampler("logit_normal"), label_dropout=0.1)
    units["base"] = measure(train_step(net, lambda: flow.loss(net, {"x_1": z, "y": y}).loss), b, min_cpu_s)
    units["reflow"] = units["base"]  # the same network and objective, on stored pairs

    net.eval()

    def forward() -> None:
        with torch.inference_mode():
            net(z, torch.rand(b), y)

    one_forward = measure(forward, b, min_cpu_s)
    nfe = sample_ode(_NullVelocity(), z[:1], y[:1], PAIRS.steps, PAIRS.solver).nfe
    units["pairs"] = Unit(one_forward.images_per_cpu_s / nfe, one_forward.flops_per_image * nfe)

    student = copy.deepcopy(net).train()
    distil = ConsistencyDistillation(
        net, student, num_intervals=CONSISTENCY.intervals, solver=CONSISTENCY.teacher_solver
    )
    units["consistency"] = measure(
        train_step(
            student,
            lambda: distil.loss(student, {"x_0": torch.randn_like(z), "x_1": z, "y": y}).loss,
            lambda: distil.after_step(student),
        ),
        b,
        min_cpu_s,
    )

    classifier = Classifier(ClassifierConfig(in_channels=CHANNELS, image_size=s, num_classes=NUM_CLASSES)).eval()

    def decode_and_score() -> None:
        with torch.inference_mode():
            classifier(vae.decode(z))

    scored = measure(decode_and_score, b, min_cpu_s)
    # evaluate: an image of the default grid, on average: its NFE in forwards, then decoded and scored.
    cells, nfe = evaluation_grid()
    forward_s, scored_s = nfe / cells / one_forward.images_per_cpu_s, 1 / scored.images_per_cpu_s
    units["evaluate"] = Unit(
        1 / (forward_s + scored_s), nfe / cells * one_forward.flops_per_image + scored.flops_per_image
    )

    def serve_one_step() -> None:
        with torch.inference_mode():
            vae.decode(net(z, torch.zeros(b), y))

    units["serve"] = measure(serve_one_step, b, min_cpu_s)
    return units


class _NullVelocity(torch.nn.Module):
    """v = 0, to count a solver's network evaluations for free."""

    def forward(self, x, t, y):
        return torch.zeros_like(x)


# --------------------------------------------------------------------------- planning


def evaluation_grid() -> tuple[int, int]:
    """(cells, network evaluations summed over the cells' images) of EvaluateConfig's default grid:
    two flow models (base, one reflow round) at every solver, step count and guidance scale (a
    guided scale costs two network passes per evaluation), and the student."""
    flow_models = 2
    flow_nfe = [
        sample_ode(_NullVelocity(), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), k, solver).nfe
        for solver in EVALUATE.flow_solvers
        for k in EVALUATE.flow_steps
    ]
    passes = [network_passes(SAMPLERS["euler"], w) for w in EVALUATE.guidance]
    cells = flow_models * len(flow_nfe) * len(passes) + len(EVALUATE.consistency_steps)
    return cells, flow_models * sum(flow_nfe) * sum(passes) + sum(EVALUATE.consistency_steps)


@dataclass(frozen=True)
class Row:
    stage: str
    work: str
    cpu_rate: float  # images per CPU-second (measured)
    gpu_rate: float | None  # images per GPU-second
    gpu_source: str  # "measured" | "estimated" | "-"
    workers: str
    hours: float | None  # on the plan's GPUs (ingest: its CPUs)
    cpu_hours: float  # the same work on the plan's CPUs (serve: CPU replicas for the target)


def gpu_rate(stage: str, unit: Unit, gpu_tflops: float, measured: dict[str, float]) -> tuple[float, str]:
    """(images per GPU-second, "measured" | "estimated")."""
    if stage in measured:
        return measured[stage], "measured"
    return gpu_tflops * 1e12 / unit.flops_per_image, "estimated"


def plan(
    units: dict[str, Unit],
    images: int,
    gpus: int,
    cpus: int,
    gpu_tflops: float,
    measured: dict[str, float],
    serve_images_per_s: float,
) -> list[Row]:
    """One row per stage: its work, rates, GPUs or actors, and hours on ``gpus`` GPUs and on ``cpus`` CPUs."""
    rows = []
    for stage, unit in units.items():
        cpu_rate = unit.images_per_cpu_s
        if stage == "serve":
            rate, source = gpu_rate(stage, unit, gpu_tflops, measured)
            replicas = max(1, math.ceil(serve_images_per_s / rate))
            rows.append(
                Row(
                    stage,
                    f"{serve_images_per_s:g} img/s at 1 step",
                    cpu_rate,
                    rate,
                    source,
                    f"{replicas} GPU replica(s)",
                    None,
                    math.ceil(serve_images_per_s / cpu_rate),
                )
            )
            continue
        if stage == "evaluate":
            cells, nfe = evaluation_grid()
            passes, work = cells * EVAL_N, f"{cells} cells x {EVAL_N:,} (avg {nfe / cells:.1f} NFE)"
        else:
            passes, work = WORKLOAD[stage] * images, f"{WORKLOAD[stage]} x {images:,}"
        cpu_hours = passes / (cpu_rate * cpus) / 3600
        if stage == "ingest":  # PNG codecs: CPU actors, no GPU work
            rows.append(Row(stage, work, cpu_rate, None, "-", f"{cpus} CPU actors", cpu_hours, cpu_hours))
            continue
        rate, source = gpu_rate(stage, unit, gpu_tflops, measured)
        kind = "GPUs (DDP)" if stage in ("vae", "base", "reflow", "consistency") else "GPU actors"
        rows.append(
            Row(stage, work, cpu_rate, rate, source, f"{gpus} {kind}", passes / (rate * gpus) / 3600, cpu_hours)
        )
    return rows


def fmt_rate(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate:,.0f}" if rate >= 100 else f"{rate:.3g}"


def fmt_hours(hours: float | None) -> str:
    if hours is None:
        return "-"
    if hours >= 1:
        return f"{hours:,.1f} h"
    return f"{hours * 60:.1f} min" if hours * 60 >= 0.1 else "<0.1 min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32,64,256", help="image sizes, from: " + ",".join(map(str, SETUPS)))
    parser.add_argument("--images", type=int, default=1_000_000)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=64)
    parser.add_argument(
        "--gpu-tflops",
        type=float,
        default=50.0,
        help="sustained matmul/conv TFLOP/s per GPU for the estimate: ~5%% of an H100/H200's bf16 "
        "peak (~990), as small models at few tokens are bound by memory and kernel launches",
    )
    parser.add_argument(
        "--gpu-rates", help='JSON {"<size>": {"<stage>": images_per_s_per_gpu}} from benchmarks/gpu_check.sh'
    )
    parser.add_argument("--serve-images-per-s", type=float, default=1000.0)
    parser.add_argument("--min-cpu-s", type=float, default=1.5, help="CPU seconds per measurement")
    parser.add_argument("--json", help="also write the measured units here")
    args = parser.parse_args()

    torch.set_num_threads(1)  # rates are per CPU
    sizes = [int(s) for s in args.sizes.split(",")]
    gpu_rates = json.load(open(args.gpu_rates)) if args.gpu_rates else {}
    started = time.perf_counter()
    measured = {size: measure_resolution(SETUPS[size], args.min_cpu_s) for size in sizes}

    print(
        f"# Unit rates on this machine, one CPU thread (torch {torch.__version__}, "
        f"{time.perf_counter() - started:.0f}s to measure)\n"
    )
    stages = list(next(iter(measured.values())))
    print("| stage | " + " | ".join(f"{s}² img/s/CPU | {s}² GFLOP/img" for s in sizes) + " |")
    print("|---|" + "---:|---:|" * len(sizes))
    for stage in stages:
        cells = [
            f"{fmt_rate(measured[s][stage].images_per_cpu_s)} | {measured[s][stage].flops_per_image / 1e9:.3g}"
            for s in sizes
        ]
        print(f"| {stage} | " + " | ".join(cells) + " |")
    print(
        f"\npairs: one teacher ODE solve ({PAIRS.solver}, {PAIRS.steps} steps); evaluate: one image of the "
        "default FID grid on average (its network evaluations, VAE decode, classifier features); "
        "serve: one 1-step image, decoded."
    )

    for size in sizes:
        setup = SETUPS[size]
        rows = plan(
            measured[size],
            args.images,
            args.gpus,
            args.cpus,
            args.gpu_tflops,
            gpu_rates.get(str(size), {}),
            args.serve_images_per_s,
        )
        print(
            f"\n# {args.images:,} images at {size}² ({setup.dit} on {setup.latent}x{setup.latent}x4 latents, "
            f"VAE f={setup.downsample}): {args.gpus} GPUs, {args.cpus} CPUs\n"
        )
        print(
            f"| stage | work | img/s per CPU (measured) | img/s per GPU | GPUs / actors | time | time on {args.cpus} CPUs |"
        )
        print("|---|---|---:|---:|---|---:|---:|")
        for row in rows:
            gpu = "-" if row.gpu_rate is None else f"{fmt_rate(row.gpu_rate)} ({row.gpu_source})"
            on_cpus = f"{row.cpu_hours:.0f} CPU replicas" if row.stage == "serve" else fmt_hours(row.cpu_hours)
            print(
                f"| {row.stage} | {row.work} | {fmt_rate(row.cpu_rate)} | {gpu} | {row.workers} | "
                f"{fmt_hours(row.hours)} | {on_cpus} |"
            )
        total = sum(row.hours or 0 for row in rows)
        print(f"\ntotal: {total:,.1f} h on {args.gpus} GPUs (stages run one after another)")
    print(
        f"\nAssumptions: GPU rates marked 'estimated' are FLOPs/image over {args.gpu_tflops:g} sustained TFLOP/s "
        "per GPU until benchmarks/gpu_check.sh measures them (--gpu-rates); training and actor pools scale "
        "linearly in GPUs; ingest is CPU-bound (PNG codecs); Ray's per-stage start-up is left out; "
        f"workload per stage: {WORKLOAD} (x dataset), evaluation {EVAL_N:,} images per cell."
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {str(s): {stage: vars(unit) for stage, unit in units.items()} for s, units in measured.items()},
                out,
                indent=2,
            )


if __name__ == "__main__":
    main()
