"""The promotion gate: the rule on numbers, then promote() against a real store and evaluate tables."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from infra.cards import GeneratorCard
from infra.metrics_table import COLUMNS
from infra.store import Store
from workers.stages.s11_promote import PromotionDecision, decide, promote

STEPS = 2


def commit_generator(store: Store, stage: str, key: str, family: str):
    """A generator manifest as far as promotion reads it (its card only)."""
    with store.begin(stage, key, config={"key": key}) as writer:
        writer.write_json("note", {"what": "promotion test model"})
        card = GeneratorCard(family=family, steps=0, latent_shape=(2, 4, 4), num_classes=3, latent_scale=1.0,
                             vae_ref="vae/none")
        return writer.commit(metrics=card.to_metrics())


def row(manifest, sampler: str, steps: int, fid: float) -> dict:
    values = dict.fromkeys(COLUMNS)
    values.update(model=manifest.stage, stage_key=manifest.ref, sampler=sampler, steps=steps, nfe=steps, n=100,
                  extractor="test", fid=fid)
    return values


def commit_evaluation(store: Store, key: str, models, rows):
    """An evaluate manifest: its inputs name the models, its metrics table holds their rows."""
    with store.begin("evaluate", key, config={"key": key}, inputs=list(models)) as writer:
        writer.write_table("metrics", pa.Table.from_pylist(rows))
        return writer.commit(metrics={"rows": len(rows)})


@pytest.mark.parametrize(
    "current, candidate_fid, current_fid, promoted, why",
    [
        (None, None, None, True, "nothing was served"),
        ("base/old", 10.0, 10.0, True, "<="),
        ("base/old", 10.4, 10.0, True, "<="),  # inside the 5% slack
        ("base/old", 10.6, 10.0, False, "worse"),
        ("base/old", 2.0, 10.0, True, "<="),
        ("base/old", None, 10.0, False, "no finite FID"),
        ("base/old", math.nan, 10.0, False, "no finite FID"),
        ("base/old", 50.0, None, True, "no FID"),
        ("base/new", 1.0, 1.0, False, "already served"),
    ],
)
def test_the_gate_on_numbers(current, candidate_fid, current_fid, promoted, why):
    decision = decide("base/new", current, STEPS, "euler", candidate_fid, current_fid, tolerance=0.05)
    assert isinstance(decision, PromotionDecision)
    assert decision.promoted is promoted
    assert why in decision.reason
    if promoted and current_fid is not None and candidate_fid is not None and current != "base/new":
        assert decision.threshold == pytest.approx(current_fid * 1.05)


def test_the_gate_refuses_a_negative_tolerance():
    with pytest.raises(ValueError, match="tolerance=-0.1"):
        decide("base/a", "base/b", 1, "euler", 1.0, 1.0, tolerance=-0.1)


def test_promote_moves_the_pointer_only_when_the_candidate_is_not_worse(local_store):
    store = local_store
    base = commit_generator(store, "base", "b1", "flow")
    student = commit_generator(store, "consistency", "c1", "consistency")
    worse = commit_generator(store, "consistency", "c2", "consistency")
    unevaluated = commit_generator(store, "consistency", "c3", "consistency")
    first = commit_evaluation(store, "e1", [base, student], [
        row(base, "euler", STEPS, 30.0), row(base, "heun", STEPS, 20.0), row(base, "euler", 8, 5.0),
        row(student, "consistency", STEPS, 12.0), row(student, "consistency", 1, 14.0),
    ])

    # Nothing served yet: the first candidate goes in.
    decision = promote(store, base.ref, first.ref, served_steps=STEPS, tolerance=0.05)
    assert decision.promoted and decision.current is None
    assert store.get_pointer("serving/current") == base.ref

    # The base model is served with Euler, so its FID is the Euler one (30), not Heun's 20 or 8 steps' 5.
    decision = promote(store, student.ref, first.ref, served_steps=STEPS, tolerance=0.05)
    assert decision.promoted, decision.reason
    assert (decision.candidate_fid, decision.current_fid, decision.sampler) == (12.0, 30.0, "consistency")
    assert store.get_pointer("serving/current") == student.ref

    # A later run's evaluation that did not score the served model: its FID comes from e1.
    second = commit_evaluation(store, "e2", [worse, unevaluated], [
        row(worse, "consistency", STEPS, 13.0), row(unevaluated, "consistency", 1, 1.0),
    ])
    decision = promote(store, worse.ref, second.ref, served_steps=STEPS, tolerance=0.05)
    assert not decision.promoted and "worse" in decision.reason
    assert decision.current_fid == 12.0 and decision.threshold == pytest.approx(12.6)
    assert store.get_pointer("serving/current") == student.ref

    # Measured another way (another extractor: other data, another feature space): no comparison.
    other_space = commit_evaluation(store, "e3", [worse], [{**row(worse, "consistency", STEPS, 99.0),
                                                            "extractor": "classifier/other"}])
    decision = promote(store, worse.ref, other_space.ref, served_steps=STEPS, tolerance=0.05)
    assert decision.promoted and decision.current_fid is None and "no FID" in decision.reason
    store.put_pointer("serving/current", student.ref)

    # With a larger slack the same candidate passes.
    decision = promote(store, worse.ref, second.ref, served_steps=STEPS, tolerance=0.1)
    assert decision.promoted
    assert store.get_pointer("serving/current") == worse.ref

    # Evaluated only at 1 step, not at the served 2: refused, whatever its 1-step FID.
    decision = promote(store, unevaluated.ref, second.ref, served_steps=STEPS, tolerance=0.05)
    assert not decision.promoted and "no finite FID at 2 step(s)" in decision.reason
    assert store.get_pointer("serving/current") == worse.ref


def test_promote_takes_a_lookup_function_and_checks_what_it_promotes(local_store):
    store = local_store
    a = commit_generator(store, "reflow", "r1", "flow")
    b = commit_generator(store, "reflow", "r2", "flow")
    fids = {(a.ref, 4, "heun"): 9.0, (b.ref, 4, "heun"): 8.0}
    calls = []

    def lookup(ref, steps, sampler):
        calls.append((ref, steps, sampler))
        return fids.get((ref, steps, sampler))

    assert promote(store, a.ref, lookup, served_steps=4, tolerance=0.0, solver="heun").promoted
    assert promote(store, b.ref, lookup, served_steps=4, tolerance=0.0, solver="heun").promoted
    assert (a.ref, 4, "heun") in calls and store.get_pointer("serving/current") == b.ref

    vae = store.begin("vae", "v", config={})
    vae.write_json("note", {})
    vae_manifest = vae.commit(metrics={})
    with pytest.raises(ValueError, match="not a generator"):
        promote(store, vae_manifest.ref, lookup, served_steps=4, tolerance=0.0)
    with pytest.raises(ValueError, match="pass an 'evaluate' ref"):
        promote(store, a.ref, vae_manifest.ref, served_steps=4, tolerance=0.0)
