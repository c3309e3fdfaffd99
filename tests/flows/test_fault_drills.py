"""The fault drills of drills/, small: the driver SIGKILLed mid-stage, S3 gone mid-stage.

The fast variants run with the suite (``slow``: minutes, not seconds); the full ones are
opt-in (``-m drill``, deselected by default) and are what RELIABILITY.md reports:

    python -m pytest -m drill tests/flows/test_fault_drills.py -s
    python -m drills.kill_drill --kills 10 --seed 0          # the same, as a script
    python -m drills.s3_outage_drill --scope pipeline
"""

from __future__ import annotations

import json

import pytest

from drills import kill_drill
from drills import s3_outage_drill as s3_drill
from drills.kit import STAGES

pytestmark = [pytest.mark.timeout(3600), pytest.mark.slow]


def report(module, result: dict) -> None:
    print("\n".join(module.summary(result)))
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "outages")}, default=str))


def test_plan_covers_every_stage_in_order_and_is_seeded():
    plan = kill_drill.plan_kills(12, seed=3)
    stages = [p.stage for p in plan]
    assert set(stages) == set(kill_drill.KILLABLE) and len(stages) == 12
    assert stages == sorted(stages, key=kill_drill.KILLABLE.index)
    assert all(0 <= p.delay_s <= kill_drill.TYPICAL_S.get(p.stage, 15.0) for p in plan)
    assert kill_drill.plan_kills(12, seed=3) == plan and kill_drill.plan_kills(12, seed=4) != plan


def check_kill_drill(result: dict, kills: int) -> None:
    assert result["violations"] == [], result["violations"]
    assert result["kills_done"] >= kills - 1  # the last point may fall after the run finished
    assert result["manifests"] == result["verified"] and result["torn"] == 0
    # One manifest per stage, but a probe after each generator (base, reflow-1, consistency).
    assert result["per_stage"] == {**dict.fromkeys(STAGES, 1), "probe": 3}, result["per_stage"]
    assert result["recomputed"] == 0
    runs = result["runs"]
    assert runs[-1]["landed"] == "finished" and runs[-1]["exit_code"] == 0
    # Every re-run skipped what had committed before it: reused stages never go down.
    reused = [r["reused"] for r in runs[1:]]
    assert reused == sorted(reused)


@pytest.mark.drill  # ~3.5 min; CI keeps the SIGKILL-mid-base drill of tests/flows/test_pipeline.py
def test_kill_drill_three_points(ray_local, tmp_path):
    result = kill_drill.drill(kills=3, seed=1, config_name="micro", workdir=tmp_path)
    report(kill_drill, result)
    check_kill_drill(result, 3)


def check_s3_drill(result: dict) -> None:
    assert result["violations"] == [], result["violations"]
    assert result["completed"] and result["torn"] == 0 and result["duplicate_commits"] == 0
    assert result["manifests"] == result["verified"]
    for outage in result["outages"]:
        assert outage["outcome"] in ("retried success", "clear transient error"), outage


def test_s3_outage_mid_stage(ray_local, tmp_path):
    result = s3_drill.drill("stages", "micro", tmp_path)
    report(s3_drill, result)
    check_s3_drill(result)
    assert result["per_stage"] == {"ingest": 1, "vae": 1, "latents": 1}


@pytest.mark.drill
def test_kill_drill_ten_points(ray_local, tmp_path):
    result = kill_drill.drill(kills=10, seed=0, config_name="tiny", workdir=tmp_path)
    report(kill_drill, result)
    check_kill_drill(result, 10)
    assert set(result["stages_hit"]) >= set(kill_drill.STAGES) - {"evaluate"}  # evaluate is seconds long


@pytest.mark.drill
def test_s3_outages_through_the_pipeline(ray_local, tmp_path):
    result = s3_drill.drill("pipeline", "tiny", tmp_path)
    report(s3_drill, result)
    check_s3_drill(result)
    assert len(result["runs"]) >= 1 and result["per_stage"]
    # One manifest per stage (check_s3_drill: none twice on the same inputs), a probe per generator.
    assert {n for stage, n in result["per_stage"].items() if stage != "probe"} == {1}, result["per_stage"]
