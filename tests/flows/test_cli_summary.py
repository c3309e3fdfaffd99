"""The end-of-run summary of ``fewstep run``: each model's best row and its 1-step FID, read
through the evaluation table's own ranking (a model that diverged is named with –)."""

from __future__ import annotations

import math

from flows.cli.run import run_summary
from infra.cards import EvaluationCard
from workers.evaluation.outputs import Evaluation, headline
from workers.evaluation.table import CEILING, FLOOR, REFERENCE, TABLE, Row, rows_table

ROWS = [
    Row(FLOOR, "ingest/i", REFERENCE, 0, 0, None, 64, "f", fid=7.0),
    Row(CEILING, "vae/v", REFERENCE, 0, 0, None, 64, "f", fid=14.0),
    Row("base", "base/b", "euler", 1, 1, 1.0, 64, "f", fid=90.0),
    Row("base", "base/b", "heun", 4, 8, 2.0, 64, "f", fid=40.0),  # the best: another sampler, steps and scale
    Row("base", "base/b", "euler", 4, 8, 2.0, 64, "f", fid=45.0),
    Row("reflow-1", "reflow/r", "euler", 1, 1, 1.0, 64, "f", fid=math.nan),  # diverged
]
INFO = dict(extractor="f", n=64, seed=0, knn_k=3, n_test=80, images_ref="ingest/i", vae_ref="vae/v", models={})


def test_the_summary_ranks_through_the_table_and_names_a_diverged_model(local_store):
    card: EvaluationCard = headline(Evaluation(ROWS, {}, {}, INFO))
    with local_store.begin("evaluate", "e", config={}) as writer:
        writer.write_table(TABLE, rows_table(ROWS))
        writer.write_bytes("report.md", b"# report\n")
        evaluation = writer.commit(metrics=card.to_metrics())
    promotion = {"candidate": "base/b", "reason": "below the bar", "promoted": False}
    text = run_summary(
        local_store, {"refs": {"evaluate": evaluation.ref}, "seconds": 3, "promotion": promotion, "served": None}
    )
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ") and line.split()}
    assert lines["FID"].strip() == "FID (f, n=64): floor 7, VAE ceiling 14"
    assert lines["base"].split() == ["base", "40", "(heun", "4", "steps", "at", "guidance", "2)", "90"]
    assert lines["reflow-1"].split() == ["reflow-1", "–", "–"]
    assert "served: nothing — base/b was not promoted: below the bar" in text


def test_the_summary_says_what_a_retrain_built_on():
    from flows.cli.run import retrain_lines

    plan = {"served": "consistency/c1", "fallback": None}
    kept = {"action": "keep", "reason": "test MSE 0.01 within the tolerance 0.1"}
    warm = {"plan": plan, "vae": kept, "warm": {"base": "base/b1", "consistency": "consistency/c1"}}
    text = "\n".join(retrain_lines(warm))
    assert "warm from the served consistency/c1 (base <- base/b1, consistency <- consistency/c1)" in text
    assert "VAE kept: test MSE 0.01" in text
    new_vae = {"plan": plan, "vae": {"action": "retrain", "reason": "beyond the tolerance"}, "warm": {}}
    assert "a NEW VAE (beyond the tolerance), so every model was retrained from scratch" in "".join(
        retrain_lines(new_vae)
    )
    fallback = {"plan": {"served": None, "fallback": "base/b1 cannot be loaded"}, "vae": None, "warm": {}}
    assert "could not be loaded (base/b1 cannot be loaded)" in "".join(retrain_lines(fallback))
    assert retrain_lines({"plan": {"served": None, "fallback": None}, "vae": None, "warm": {}}) == []
