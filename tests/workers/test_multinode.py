"""Nothing assumes one machine: a two-node Ray cluster (ray.cluster_utils.Cluster) on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]


def test_latents_actors_and_training_workers_span_two_nodes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    script = Path(__file__).with_name("multinode_job.py")
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(next(line for line in reversed(done.stdout.splitlines()) if line.startswith("{")))
    assert len(result["nodes"]) == 2
    assert set(result["encoder_nodes"]) == set(result["nodes"]), result
    assert result["steps"] == 6
    assert sorted(result["train_nodes"]) == sorted(result["nodes"]), result
