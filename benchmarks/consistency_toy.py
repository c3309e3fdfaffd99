"""Multistep consistency sampling, side by side, on a 2-D toy: which setup improves with steps.

    python benchmarks/consistency_toy.py [--seeds 5] [--json]

For each seed it trains, with fewstep's own objectives and samplers, a base flow-matching
model, its reflow pairs and one reflow round, then consistency students under each
distillation setup:

    reflow/pairs   teacher = reflow, data = the reflow round's pairs (x_0, x_1)   (pipeline default)
    reflow/noise   teacher = reflow, data = x_1 with fresh x_0 ~ N(0, I)          (consistency.data: latents)
    base/noise     teacher = base,   data = x_1 with fresh x_0 ~ N(0, I)

and samples each at 1, 2, 4 and 8 steps with every re-noising rule:

    fresh         z_i = eps_i ~ N(0, I)                          (Song et al.; the sampler before)
    half-coupled  z_i = (x_0 + eps_i) / sqrt(2)                  (``coupling=sqrt(1/2)``)
    coupled       z_i = x_0, the sample's own starting noise     (``coupling=1``)
    inferred      z_i = (x_{t_{i-1}} - t_{i-1} x_hat) / (1 - t_{i-1}), the x_0 the student's
                  last jump implies (= an Euler step of the student's velocity; not in the library)

at start times i/k ("uniform") or snapped to the distillation grid n/N ("grid").
Every student is distilled with label dropout 0.1, so it can also be sampled without a label;
one extra student (the recommended setup without dropout) shows what that buys.

The distance is sliced Wasserstein-2 (:class:`SlicedW2`) between 4,000 samples and a
held-out reference with the same labels and exactly balanced modes; smaller is better. The
real-vs-real floor at this size is printed too. Every cell is the mean over seeds with a 95 %
t-interval; each seed retrains everything (base, pairs, reflow, students) and redraws the
evaluation noise, so the interval covers training as well as sampling noise. "d(k-1)" is the
paired per-seed difference SW@k - SW@1 with its interval: below 0 means more steps help. A
second table gives paired differences between chosen rows (the recommended setup against
the others; grid against uniform times; label dropout against none).

Runs on one thread in about 100 s on an idle core (5 seeds); ``--json`` prints one JSON object last.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests", "models"))

from toy import ToyVelocityMLP, fit, sample_mixture, sample_mixture_given  # noqa: E402

from models.consistency import (  # noqa: E402
    ConsistencyDistillation,
    consistency_fn,
    consistency_sample,
    consistency_times,
)
from models.conventions import full_t, interpolate, null_labels  # noqa: E402
from models.objectives import FlowMatching  # noqa: E402
from models.samplers import sample_ode  # noqa: E402

NUM_CLASSES = 2
BATCH = 256
BASE_STEPS = 1500
REFLOW_STEPS = 1000
CD_STEPS = 1000
N_PAIRS = 20_000
N_EVAL = 4000
INTERVALS = 18
LABEL_DROPOUT = 0.1
STEPS = (1, 2, 4, 8)
# Two-sided 97.5 % quantiles of Student's t by degrees of freedom (1..9), for the intervals.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


@dataclass(frozen=True)
class Setup:
    """One distillation setup: which teacher, on which data, with which label dropout."""

    name: str
    teacher: str  # "base" | "reflow"
    pairs: bool  # distil on the reflow pairs (True) or on data with fresh noise
    label_dropout: float = LABEL_DROPOUT


SETUPS = (
    Setup("reflow/pairs", "reflow", True),
    Setup("reflow/noise", "reflow", False),
    Setup("base/noise", "base", False),
)
NO_DROPOUT = Setup("reflow/pairs, no label dropout", "reflow", True, label_dropout=0.0)
RECOMMENDED = "reflow/pairs | coupled, grid"
# (row, baseline) pairs compared seed by seed: the recommended setup against the sampler before
# and each other setup's best sampler; what the grid times and the label dropout each change.
PAIRED = (
    ("reflow/pairs | fresh, uniform", RECOMMENDED),
    ("reflow/noise | coupled, grid", RECOMMENDED),
    ("base/noise | fresh, grid", RECOMMENDED),
    ("base/noise | fresh, grid", "base/noise | fresh, uniform"),
    ("reflow/pairs | coupled, grid", "reflow/pairs | coupled, uniform"),
    ("reflow/pairs | null label, coupled, grid", "reflow/pairs, no label dropout | null label, coupled, grid"),
)


@torch.no_grad()
def sample_inferred(net: nn.Module, x_0: Tensor, y: Tensor, times: list[float]) -> Tensor:
    """Re-noise along the x_0 the last jump implies: x_0' = (x_s - s x_hat) / (1 - s)."""
    x_s, s = x_0, times[0]
    x_hat = consistency_fn(net, x_s, full_t(s, x_0), y)
    for t_i in times[1:]:
        z = (x_s - s * x_hat) / (1 - s)
        x_s, s = interpolate(z, x_hat, full_t(t_i, x_0)), t_i
        x_hat = consistency_fn(net, x_s, full_t(s, x_0), y)
    return x_hat


def samplers() -> dict[str, Callable[[nn.Module, Tensor, Tensor, int, int], Tensor]]:
    """name -> sample(net, x_0, y, steps, seed) for each re-noising rule and time schedule."""

    def library(coupling: float, grid: bool):
        def run(net, x_0, y, steps, seed):
            g = torch.Generator().manual_seed(seed)
            return consistency_sample(
                net, x_0, y, steps, generator=g, coupling=coupling, num_intervals=INTERVALS if grid else None
            ).x_1

        return run

    def inferred(grid: bool):
        def run(net, x_0, y, steps, seed):
            return sample_inferred(net, x_0, y, consistency_times(steps, INTERVALS if grid else None))

        return run

    return {
        "fresh, uniform": library(0.0, False),  # the sampler before this change
        "fresh, grid": library(0.0, True),
        "half-coupled, grid": library(math.sqrt(0.5), True),  # z = (x_0 + eps) / sqrt(2)
        "coupled, uniform": library(1.0, False),
        "coupled, grid": library(1.0, True),
        "inferred, grid": inferred(True),
    }


def data_batch() -> dict[str, Tensor]:
    x_1, y = sample_mixture(BATCH)
    return {"x_1": x_1, "y": y}


def train_seed(seed: int) -> dict[str, nn.Module]:
    """Base, reflow and one student per setup, all from ``seed``."""
    torch.manual_seed(seed)
    base = ToyVelocityMLP(dim=2, num_classes=NUM_CLASSES)
    fit(FlowMatching(label_dropout=LABEL_DROPOUT), base, data_batch, BASE_STEPS)

    # Pairs as the pipeline makes them: the base ODE (Heun, 32 steps) from labelled noise.
    y_p = torch.randint(0, NUM_CLASSES, (N_PAIRS,))
    x_0_p = torch.randn(N_PAIRS, 2)
    x_1_p = sample_ode(base, x_0_p, y_p, steps=32, solver="heun").x_1

    def pair_batch() -> dict[str, Tensor]:
        i = torch.randint(0, N_PAIRS, (BATCH,))
        return {"x_0": x_0_p[i], "x_1": x_1_p[i], "y": y_p[i]}

    reflow = copy.deepcopy(base)
    fit(FlowMatching(label_dropout=LABEL_DROPOUT), reflow, pair_batch, REFLOW_STEPS, lr=1e-3)
    models = {"base": base, "reflow": reflow}
    for setup in SETUPS + (NO_DROPOUT,):
        teacher = models[setup.teacher]
        # The pipeline starts the student at the teacher's weights (a fresh, trainable copy).
        student = copy.deepcopy(teacher).requires_grad_(True)
        cd = ConsistencyDistillation(
            teacher, student, num_intervals=INTERVALS, solver="heun", ema_decay=0.95, label_dropout=setup.label_dropout
        )
        fit(cd, student, pair_batch if setup.pairs else data_batch, CD_STEPS, lr=1e-3)
        models[setup.name] = student
    return models


def evaluate_seed(models: dict[str, nn.Module], seed: int) -> dict[str, dict[int, float]]:
    """SW2 of every (model, sampler, steps) and of the reference rows, on fresh evaluation draws."""
    g = torch.Generator().manual_seed(10_000 + seed)
    y = torch.randint(0, NUM_CLASSES, (N_EVAL,), generator=g)
    x_0 = torch.randn(N_EVAL, 2, generator=g)
    reference = sample_mixture_given(y, g, stratified=True)
    sw = SlicedW2(reference)
    rows: dict[str, dict[int, float]] = {
        "real vs real (floor)": {k: sw(sample_mixture_given(y, g)) for k in STEPS},
        "base ODE, Heun 32": {k: sw(sample_ode(models["base"], x_0, y, 32, "heun").x_1) for k in STEPS},
        "base ODE, Euler k": {k: sw(sample_ode(models["base"], x_0, y, k).x_1) for k in STEPS},
        "reflow ODE, Euler k": {k: sw(sample_ode(models["reflow"], x_0, y, k).x_1) for k in STEPS},
    }
    for setup in SETUPS:
        for name, sample in samplers().items():
            rows[f"{setup.name} | {name}"] = {
                k: sw(sample(models[setup.name], x_0, y, k, 20_000 + seed)) for k in STEPS
            }
    rows[f"{NO_DROPOUT.name} | coupled, grid"] = {
        k: sw(samplers()["coupled, grid"](models[NO_DROPOUT.name], x_0, y, k, 20_000 + seed)) for k in STEPS
    }

    # Unconditional requests: the null label against the whole mixture (both classes).
    y_null = null_labels(NUM_CLASSES, N_EVAL)
    half = N_EVAL // NUM_CLASSES  # stratified: the modes of class 0, then those of class 1
    sw_all = SlicedW2(sample_mixture_given(torch.arange(N_EVAL) // half, g, stratified=True))
    rows["base ODE, Heun 32 | null label"] = {
        k: sw_all(sample_ode(models["base"], x_0, y_null, 32, "heun").x_1) for k in STEPS
    }
    for setup, sampler in ((SETUPS[0], "coupled, grid"), (NO_DROPOUT, "coupled, grid"), (SETUPS[2], "fresh, grid")):
        rows[f"{setup.name} | null label, {sampler}"] = {
            k: sw_all(samplers()[sampler](models[setup.name], x_0, y_null, k, 30_000 + seed)) for k in STEPS
        }
    return rows


class SlicedW2:
    """SW_2(x, reference) over ``n_dirs`` evenly spaced directions of the plane.

    In 2-D the directions can be a quadrature of the half circle rather than random draws
    (as ``tests/models/toy.py`` uses), so the estimate carries no direction noise; the
    reference's sorted projections are computed once. Equal sample sizes: 1-D W_2 is the
    distance between sorted projections.
    """

    def __init__(self, reference: Tensor, n_dirs: int = 128):
        angle = math.pi * torch.arange(n_dirs, dtype=reference.dtype) / n_dirs
        self.theta = torch.stack([angle.cos(), angle.sin()])  # (2, P) unit directions
        self.sorted_ref = (reference @ self.theta).sort(dim=0).values  # (N, P)

    def __call__(self, x: Tensor) -> float:
        if x.shape[0] != self.sorted_ref.shape[0]:
            raise ValueError(f"need {self.sorted_ref.shape[0]} samples, got {x.shape[0]}")
        projected = (x @ self.theta).sort(dim=0).values  # (N, P)
        return float((projected - self.sorted_ref).pow(2).mean().sqrt())


def interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % t-interval over seeds (0 for a single seed)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, 0.0
    half = T_975.get(len(values) - 1, 1.96) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


def print_table(table: dict[str, dict[str, list[float]]]) -> None:
    width = max(len(r) for r in table) + 2
    print(f"{'candidate':<{width}}" + "".join(f"{c:>16}" for c in next(iter(table.values()))))
    for row, cells in table.items():
        print(f"{row:<{width}}" + "".join(f"{m:>9.4f}±{h:<6.4f}" for m, h in cells.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    args = parser.parse_args()
    torch.set_num_threads(1)

    started = time.perf_counter()
    per_seed = []
    for seed in range(args.seeds):
        per_seed.append(evaluate_seed(train_seed(seed), seed))
        print(f"seed {seed} done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)

    table: dict[str, dict[str, list[float]]] = {}
    for row in per_seed[0]:
        cells = {}
        for k in STEPS:
            cells[f"sw@{k}"] = list(interval([seed[row][k] for seed in per_seed]))
        for k in STEPS[1:]:
            cells[f"d({k}-1)"] = list(interval([seed[row][k] - seed[row][1] for seed in per_seed]))
        table[row] = cells

    paired: dict[str, dict[str, list[float]]] = {
        f"{row}  -  {base}": {
            f"d@{k}": list(interval([seed[row][k] - seed[base][k] for seed in per_seed])) for k in STEPS
        }
        for row, base in PAIRED
    }

    print(f"SW2 to held-out data (lower is better), mean ± 95% t-interval over {args.seeds} seeds")
    print_table(table)
    print("\nPaired per-seed differences SW2(a) - SW2(b) (below 0: a is better), mean ± 95% t-interval")
    print_table(paired)
    seconds = time.perf_counter() - started
    print(f"{seconds:.0f} s on {torch.get_num_threads()} thread(s)")
    if args.json:
        print(
            json.dumps(
                {
                    "seeds": args.seeds,
                    "intervals": INTERVALS,
                    "seconds": round(seconds, 1),
                    "metric": "sliced W2, mean and 95% half-width",
                    "table": table,
                    "recommended": RECOMMENDED,
                    "paired": paired,
                    "per_seed": per_seed,
                }
            )
        )


if __name__ == "__main__":
    main()
