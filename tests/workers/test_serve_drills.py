"""The Serve drills of drills/drill_serve_*.py, small: the same code, fewer requests.

One app with two replicas on a tiny synthetic store, driven from a separate client process
over loopback. In file order: mixed valid/invalid load, property-based fuzzing from the
OpenAPI schema, hot swaps to broken models under load, and a replica killed under load.
Each test prints its figures (``-s`` shows them); the full drills and what they measured
are in RELIABILITY.md.
"""

from __future__ import annotations

import json

import pytest

from drills import kit
from drills.drill_serve_fuzz import fuzz_drill
from drills.drill_serve_load import kill_drill, load_drill
from drills.drill_serve_swap import swap_drill

pytestmark = pytest.mark.timeout(300)

REPLICAS = 2


@pytest.fixture(scope="module")
def drill(ray_local, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("drills")
    tiny = kit.tiny_store(workdir / "store")
    with kit.serving(tiny.store.uri, kit.drill_config(replicas=REPLICAS)) as url:
        yield url, tiny, workdir


def show(name: str, figures) -> None:
    print(f"\n{name}: {json.dumps(figures.as_dict(), sort_keys=True)}")


def test_mixed_load_gets_no_5xx_and_every_valid_body_a_200(drill):
    url, _, workdir = drill
    figures = load_drill(url, workdir, requests=200, concurrency=32, invalid=0.3)
    show("load", figures)
    assert figures.requests == 200 and figures.valid > 100 and figures.invalid > 30
    assert figures.valid_status == {"200": figures.valid}, figures.valid_status
    assert set(figures.invalid_status) <= {"413", "422"} and figures.invalid_5xx == 0, figures.invalid_status
    assert "413" in figures.invalid_status  # the oversized bodies were in the mix
    assert 0 < figures.p50_ms <= figures.p95_ms <= figures.p99_ms


def test_fuzzing_from_the_openapi_schema_finds_no_5xx(drill):
    url, _, _ = drill
    figures = fuzz_drill(url, examples=200, seed_value=0)
    show("fuzz", figures)
    assert figures.falsified is None, figures.falsified
    assert figures.examples >= 200 and figures.server_errors == 0 and figures.in_limits_failed == 0
    assert set(figures.status) == {"in_limits", "schema", "mutated", "raw"}, figures.status
    assert figures.status["in_limits"].get("200", 0) > 10


def test_hot_swaps_to_broken_models_under_load_keep_the_old_model(drill):
    url, tiny, workdir = drill
    figures = swap_drill(url, tiny, workdir, concurrency=8, hold_s=1.5)
    show("swap", figures)
    assert figures.failed == 0 and figures.requests > 20
    assert [b.kind for b in figures.bad] == ["corrupt", "nan", "overflow"]
    assert figures.bad[0].error.startswith("IntegrityError: file 'model' of base/tiny5")
    assert figures.bad[1].error.startswith("UnfitModel: base/tiny3-nan: 1 tensor(s) of its network hold NaN")
    assert figures.bad[2].error.startswith("UnfitModel: base/tiny4-overflow draws non-finite latents")
    assert all(b.attempts == 1 for b in figures.bad), "a failed swap was retried within its back-off"
    assert list(figures.models_while_bad) == [tiny.first.ref], figures.models_while_bad
    assert figures.health_after == {"status": "ok", "model": tiny.second.ref, "reasons": [], "failed_swap": None}


def test_a_replica_killed_under_load(drill):
    url, _, workdir = drill
    figures = kill_drill(url, workdir, requests=300, replicas=REPLICAS, concurrency=32)
    show("kill", figures)
    assert figures.requests == 300
    assert figures.failed <= 32, "more requests failed than were in flight"
    assert figures.failed_after_recovery == 0
    assert figures.first_ok_after_kill_s < 10  # the other replica answers meanwhile
    assert figures.replicas_back_s < 120
