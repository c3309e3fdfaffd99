"""The arithmetic of benchmarks/capacity.py's plan (the README's capacity table), on given unit rates:
no timing is measured or asserted here."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "capacity.py"


@pytest.fixture(scope="module")
def capacity():
    spec = importlib.util.spec_from_file_location("capacity", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["capacity"] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("capacity", None)


def test_plan_turns_unit_rates_into_workers_and_hours(capacity):
    Unit = capacity.Unit
    units = {
        stage: Unit(images_per_cpu_s=10.0, flops_per_image=1e12)
        for stage in ("ingest", "vae", "latents", "base", "reflow", "pairs", "consistency", "evaluate", "serve")
    }
    rows = {
        row.stage: row
        for row in capacity.plan(
            units, images=3600, gpus=2, cpus=4, gpu_tflops=5.0, measured={"base": 100.0}, serve_images_per_s=12.0
        )
    }
    # base: 40 epochs of 3600 images at a measured 100 img/s per GPU on 2 GPUs.
    assert rows["base"].gpu_source == "measured" and rows["base"].hours == pytest.approx(40 * 3600 / 200 / 3600)
    # reflow: estimated from FLOPs, 5 TFLOP/s over 1 TFLOP per image = 5 img/s per GPU.
    assert rows["reflow"].gpu_source == "estimated" and rows["reflow"].gpu_rate == pytest.approx(5.0)
    assert rows["reflow"].hours == pytest.approx(20 * 3600 / 10 / 3600)
    # ingest: CPU actors only.
    assert rows["ingest"].gpu_rate is None and rows["ingest"].hours == pytest.approx(3600 / 40 / 3600)
    assert rows["base"].cpu_hours == pytest.approx(40 * 3600 / 40 / 3600)
    # serve: replicas for the target rate.
    assert rows["serve"].workers.startswith(f"{math.ceil(12 / 5)} GPU") and rows["serve"].cpu_hours == 2


def test_evaluation_grid_counts_the_default_cells_and_their_network_evaluations(capacity):
    cells, nfe = capacity.evaluation_grid()
    flow_steps = (1, 2, 4, 8, 16, 32)
    # base and reflow x (euler, heun) x steps x guidance (1, 2, 4), student at 1, 2, 4
    assert cells == 2 * 2 * len(flow_steps) * 3 + 3
    # Heun: 2 per step; guidance 1 one network pass, 2 and 4 two each (the doubled batch)
    assert nfe == 2 * (sum(flow_steps) + sum(2 * k for k in flow_steps)) * (1 + 2 + 2) + (1 + 2 + 4)
