"""Flow-map objectives side by side on the 2-D mixture toy: MeanFlow and Shortcut, plain and adaptive loss.

    PYTHONPATH=. python3 benchmarks/flowmap_toy.py [--steps 1500] [--seeds 0 1]

A flow teacher (tests/models/toy.py's MLP, flow matching, 1500 steps) is distilled into a flow-map
MLP by each objective at the same budget; prints the sliced Wasserstein-2 distance of 1, 2, 4 and 8
step samples to a stratified reference set (lower is better), beside the teacher's Heun steps.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "models"))
from toy import ToyFlowMapMLP, ToyVelocityMLP, fit, sample_mixture, sample_mixture_given, sliced_wasserstein  # noqa: E402

from models.flowmap import MeanFlow, Shortcut, flowmap_sample  # noqa: E402
from models.objectives import FlowMatching  # noqa: E402
from models.samplers import sample_ode  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)

    def batch():
        x_1, y = sample_mixture(256)
        return {"x_1": x_1, "y": y}

    torch.manual_seed(0)
    teacher = ToyVelocityMLP(dim=2, num_classes=2)
    fit(FlowMatching(label_dropout=0.1), teacher, batch, 1500)
    g = torch.Generator().manual_seed(123)
    y = torch.randint(0, 2, (4000,), generator=g)
    x_0 = torch.randn(4000, 2, generator=g)
    target = sample_mixture_given(y, g, stratified=True)
    heun = {k: sliced_wasserstein(sample_ode(teacher, x_0, y, k, solver="heun").x_1, target) for k in (1, 2, 4, 32)}
    print("teacher, Heun steps:", {k: round(v, 3) for k, v in heun.items()})
    objectives = {
        "meanflow p=0": lambda: MeanFlow(teacher, adaptive_p=0.0, label_dropout=0.1),
        "meanflow p=0.5": lambda: MeanFlow(teacher, adaptive_p=0.5, label_dropout=0.1),
        "meanflow p=1": lambda: MeanFlow(teacher, adaptive_p=1.0, label_dropout=0.1),
        "shortcut p=0": lambda: Shortcut(teacher, adaptive_p=0.0, label_dropout=0.1),
        "shortcut p=1": lambda: Shortcut(teacher, adaptive_p=1.0, label_dropout=0.1),
    }
    for name, make in objectives.items():
        for seed in args.seeds:
            torch.manual_seed(seed)
            student = ToyFlowMapMLP(dim=2, num_classes=2, hidden=128)
            fit(make(), student, batch, args.steps)
            sw = {k: sliced_wasserstein(flowmap_sample(student, x_0, y, k).x_1, target) for k in (1, 2, 4, 8)}
            print(f"{name:15s} seed {seed}: SW2 by steps", {k: round(v, 3) for k, v in sw.items()}, flush=True)


if __name__ == "__main__":
    main()
