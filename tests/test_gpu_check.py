"""benchmarks/gpu_check.sh runs to the end without a GPU (its --short smoke mode), saying what it skipped.

The check is what a lent GPU machine runs; this test keeps it working between those times.
No timing is asserted: only that every part ran and reported its figures.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow, pytest.mark.drill]  # ~2.5 min: a drill, with the others


def test_gpu_check_runs_to_the_end_on_the_cpu(ray_local, tmp_path):
    env = dict(
        os.environ,
        CUDA_VISIBLE_DEVICES="",
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
        PYTHONPATH=str(ROOT),
    )
    out = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--short", "--out", str(tmp_path / "store")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=850,
    )
    assert out.returncode == 0, f"{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    for part in ("== matmul", "== train", "== pipeline", "== serve", "== done"):
        assert part in out.stdout, out.stdout[-4000:]
    assert "SKIP bf16 matmul rate: no CUDA device" in out.stdout
    assert "SKIP bf16 training MFU: no CUDA device" in out.stdout

    report = json.loads(next(line for line in reversed(out.stdout.splitlines()) if line.startswith("{")))
    assert report["device"] == "cpu" and report["short"] is True
    assert report["train"]["samples_per_s"] > 0 and "mfu" not in report["train"]
    assert {"ingest", "vae", "latents", "base", "pairs", "reflow", "consistency", "evaluate"} <= set(
        report["pipeline"]["stage_s"]
    )
    assert report["serve"]["batched_images_per_s_c32"] > 0
    assert report["serve"]["batched_over_unbatched_c32"] > 0 and report["serve"]["overhead_ms_c1"] is not None
