"""Champion against challenger in the Prefect UI: the promote task publishes its decision and figures
either way, and the run report shows the served model's quality over time."""

from __future__ import annotations

import pytest

from infra.champions import read_history
from infra.config import ServeConfig
from infra.store import Store
from tests.flows.promotion_fixtures import commit_evaluation, commit_generator

pytestmark = pytest.mark.timeout(600)


def promotion_artifact(prefect_flow_run_id) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:  # the harness is shared: read this flow run's artifacts only
        ran = FlowRunFilter(id=FlowRunFilterId(any_=[prefect_flow_run_id]))
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=ran) if a.key}
    return artifacts["fewstep-promotion"].data


def test_the_promote_task_publishes_the_decision_and_its_figures_both_ways(prefect_harness, tmp_path):
    from prefect import flow

    from flows.pipeline import decision_record, promote_task

    uri = str(tmp_path / "store")
    store = Store.open(uri)
    champion, worse, better = (
        commit_generator(store, "champ"),
        commit_generator(store, "worse"),
        commit_generator(store, "better"),
    )
    wobble = [0.1, -0.1, 0.05, -0.05] * 25
    week = commit_evaluation(
        store,
        "week",
        [(m, fid, [fid + w for w in wobble]) for m, fid in ((champion, 20.0), (worse, 23.0), (better, 18.0))],
    )
    serve = ServeConfig()
    decisions = {}

    @flow
    def gate(candidate: str, run_id: str):
        decisions[candidate] = promote_task(uri, serve, candidate, week.ref, run_id)

    gate(champion.ref, "run-0")
    refused_run = gate(worse.ref, "run-1", return_state=True).state_details.flow_run_id
    promoted_run = gate(better.ref, "run-2", return_state=True).state_details.flow_run_id

    refused = promotion_artifact(refused_run)
    assert "# Champion against challenger: not promoted" in refused
    assert f"| champion (served before) | `{champion.ref}` | 20 | [19.5, 20.5] | `{week.ref}` |" in refused
    assert f"| challenger | `{worse.ref}` | 23 | [22.5, 23.5] | `{week.ref}` |" in refused
    assert "Paired difference FID(challenger) − FID(champion): [+3, +3]" in refused
    assert "**Decision:** not promoted." in refused and "worse beyond the interval" in refused

    promoted = promotion_artifact(promoted_run)
    assert "# Champion against challenger: promoted" in promoted and "Paired difference" in promoted
    assert f"| challenger | `{better.ref}` | 18 |" in promoted and "not worse beyond the interval" in promoted
    assert store.get_pointer("serving/current") == better.ref

    # What the run record keeps: the same figures, as plain JSON.
    record = decision_record(decisions[worse.ref])
    store.finish_run("run-1", {"evaluate": week.ref}, {"promotion": record})
    kept = next(run for run in store.list_runs() if run["run_id"] == "run-1")["info"]["promotion"]
    assert (kept["promoted"], kept["candidate"], kept["current"], kept["current_fid"]) == (
        False,
        worse.ref,
        champion.ref,
        20.0,
    )
    assert kept["difference"] == pytest.approx([3.0, 3.0]) and "worse beyond" in kept["reason"]
    assert decision_record({"candidate_fid": float("nan"), "difference": None})["candidate_fid"] is None


def test_the_run_report_shows_the_served_model_over_time(local_store):
    from flows.artifacts import run_report
    from workers.stages.s11_promote import promote

    store = local_store
    a, b = commit_generator(store, "a"), commit_generator(store, "b")
    week = commit_evaluation(store, "week", [(a, 20.0, [20.0] * 100), (b, 18.0, [18.0] * 100)])
    promote(store, a.ref, week.ref, served_steps=1, run_id="run-a")
    decision = promote(store, b.ref, week.ref, served_steps=1, run_id="run-b").as_dict()
    report = run_report({"evaluate": week.ref}, 1.0, decision, b.ref, [], read_history(store, "serving/current"))
    assert "## Served model over time" in report
    rows = [line for line in report.splitlines() if line.startswith("| ") and "| promote |" in line]
    assert [r.split(" | ")[2:5] for r in rows] == [
        [f"`{a.ref}`", "20", "[19.5, 20.5]"],
        [f"`{b.ref}`", "18", "[17.5, 18.5]"],
    ]
    assert "run-b" in rows[1] and "`fewstep-promotion`" in report
    assert "Served model over time" not in run_report({}, 1.0, decision, b.ref)  # no history: no table
