"""What a training stage publishes to the Prefect UI: its metrics (the held-out loss among them) and its curve."""

from __future__ import annotations

import json

import pytest

from infra.cards import GeneratorCard
from infra.store import Store

pytestmark = pytest.mark.timeout(300)


def test_a_generator_stage_publishes_its_heldout_loss_and_its_curve_table(prefect_harness, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.artifacts import publish_stage

    store = Store.open(str(tmp_path / "store"))
    curve = [
        {"step": 10, "loss": 1.5, "heldout_loss": 1.25, "heldout_loss_raw": 1.3},
        {"step": 20, "loss": 1.2, "heldout_loss": 1.0, "heldout_loss_raw": 1.1},
    ]
    card = GeneratorCard(
        family="flow",
        steps=20,
        final_heldout_loss=1.0,
        heldout="16 test latents",
        latent_shape=(2, 4, 4),
        num_classes=2,
        latent_scale=1.0,
        vae_ref="vae/none",
    )
    with store.begin("base", "artifacts", config={}) as writer:
        writer.write_json("curve", {"curve": curve, "resumed_from": 0, "heldout": card.heldout})
        manifest = writer.commit(metrics=card.to_metrics())

    @flow
    def publish():
        publish_stage(manifest, store)

    run_id = publish(return_state=True).state_details.flow_run_id
    with get_client(sync_client=True) as client:  # the harness is shared: read this flow run's artifacts only
        ran = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=ran) if a.key}
    rows = artifacts["fewstep-base-metrics"].data
    metrics = {row["metric"]: row["value"] for row in (json.loads(rows) if isinstance(rows, str) else rows)}
    assert metrics["final_heldout_loss"] == "1.0" and metrics["heldout"] == "16 test latents", (
        run_id,
        artifacts["fewstep-base-metrics"].flow_run_id,
        artifacts["fewstep-base-metrics"].created,
        manifest.metrics,
    )
    table = artifacts["fewstep-base-curve"].data
    assert "| 20 | 1.2 | 1 | 1.1 |" in table and "16 test latents" in table
