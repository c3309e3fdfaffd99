"""Cost of one training step: MeanFlow and Shortcut against consistency distillation, on one DiT.

    PYTHONPATH=. python3 benchmarks/flowmap_step_cost.py [--model DiT-XXS/2] [--size 8] [--batch 64]

Each objective's step (loss, backward, Adam step, after_step) on the same teacher, batch and
guidance, timed side by side in one process (interleaved rounds, median of each); prints
seconds per step and the ratios to consistency distillation. Plain PyTorch, no Ray.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from models.consistency import ConsistencyDistillation
from models.dit import DiT, dit_config
from models.flowmap import MeanFlow, Shortcut
from models.flowmap_dit import flowmap_from_velocity


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="DiT-XXS/2")
    parser.add_argument("--size", type=int, default=8)  # latent side (the shapes preset: 32 px / 4)
    parser.add_argument("--channels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3)  # steps per round per objective
    parser.add_argument("--threads", type=int, default=0)  # 0: torch's default
    # The share of each batch with s = t (no JVP, no half steps); 0 prices the gap target on every row.
    parser.add_argument("--equal-fraction", type=float, default=0.75)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    teacher = DiT(dit_config(args.model, input_size=args.size, in_channels=args.channels, num_classes=10))
    with torch.no_grad():  # a teacher off AdaLN-Zero's zeros, so every layer computes
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher.eval()

    def setups():
        cd_student = copy.deepcopy(teacher).train()
        fm_student = flowmap_from_velocity(teacher).train()
        sc_student = flowmap_from_velocity(teacher).train()
        return {
            "consistency": (
                cd_student,
                ConsistencyDistillation(teacher, cd_student, num_intervals=18, guidance=args.guidance),
            ),
            "meanflow": (fm_student, MeanFlow(teacher, guidance=args.guidance, equal_fraction=args.equal_fraction)),
            "shortcut": (sc_student, Shortcut(teacher, guidance=args.guidance, equal_fraction=args.equal_fraction)),
        }

    runs = setups()
    optimizers = {name: torch.optim.Adam(model.parameters(), lr=1e-4) for name, (model, _) in runs.items()}
    shape = (args.batch, args.channels, args.size, args.size)
    batch = {"x_1": torch.randn(shape), "y": torch.randint(0, 10, (args.batch,))}

    def step(name: str) -> None:
        model, objective = runs[name]
        out = objective.loss(model, batch)
        optimizers[name].zero_grad(set_to_none=True)
        out.loss.backward()
        optimizers[name].step()
        objective.after_step(model)

    for name in runs:  # warm-up
        step(name)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name in runs:
            started = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            times[name].append((time.perf_counter() - started) / args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"{args.model} on ({args.channels}, {args.size}, {args.size}) latents, batch {args.batch}, "
        f"guidance {args.guidance}, s = t share {args.equal_fraction}, {torch.get_num_threads()} threads"
    )
    for name, seconds in median.items():
        print(f"  {name:12s} {seconds * 1000:8.1f} ms/step   x{seconds / median['consistency']:.2f} of consistency")


if __name__ == "__main__":
    main()
