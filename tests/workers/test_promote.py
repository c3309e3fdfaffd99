"""The promotion gate: the rule on numbers, then promote() against a real store and evaluate tables."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from infra.cards import GeneratorCard
from infra.champions import read_history
from infra.store import Store
from workers.evaluation.table import CEILING, COLUMNS, DRAWS, FLOOR, REFERENCE
from workers.stages.s11_promote import Bar, PromotionDecision, Scored, decide, promote

STEPS = 2


def commit_generator(store: Store, stage: str, key: str, family: str):
    """A generator manifest as far as promotion reads it (its card only)."""
    with store.begin(stage, key, config={"key": key}) as writer:
        writer.write_json("note", {"what": "promotion test model"})
        card = GeneratorCard(
            family=family, steps=0, latent_shape=(2, 4, 4), num_classes=3, latent_scale=1.0, vae_ref="vae/none"
        )
        return writer.commit(metrics=card.to_metrics())


def row(manifest, sampler: str, steps: int, fid: float, half_width: float = 0.5) -> dict:
    values = dict.fromkeys(COLUMNS)
    values.update(
        model=manifest.stage,
        stage_key=manifest.ref,
        sampler=sampler,
        steps=steps,
        nfe=steps,
        n=100,
        extractor="test",
        fid=fid,
        fid_low=fid - half_width,
        fid_high=fid + half_width,
    )
    return values


def commit_evaluation(store: Store, key: str, models, rows):
    """An evaluate manifest: its inputs name the models, its metrics table holds their rows."""
    with store.begin("evaluate", key, config={"key": key}, inputs=list(models)) as writer:
        writer.write_table("metrics", pa.Table.from_pylist(rows))
        return writer.commit(metrics={"rows": len(rows)})


def score(fid, low=None, high=None, evaluation="evaluate/e", draws=()):
    return None if fid is None else Scored(fid, low, high, evaluation, tuple(draws))


@pytest.mark.parametrize(
    "current, candidate, served, promoted, why",
    [
        (None, None, None, True, "nothing was served"),
        ("base/new", score(1.0), score(1.0), False, "already served"),
        ("base/old", None, score(10.0), False, "no finite FID"),
        ("base/old", score(math.nan), score(10.0), False, "no finite FID"),
        ("base/old", score(50.0), None, True, "no FID at 2 step(s) to defend it"),
        # Two evaluations: intervals that overlap are no result; one wholly above is a regression.
        ("base/old", score(10.6, 9.8, 11.4, "evaluate/b"), score(10.0, 9.2, 10.8, "evaluate/a"), True, "not worse"),
        (
            "base/old",
            score(12.0, 11.5, 12.5, "evaluate/b"),
            score(10.0, 9.2, 10.8, "evaluate/a"),
            False,
            "worse beyond",
        ),
        # One evaluation: the paired difference decides, even where the intervals overlap.
        (
            "base/old",
            score(10.6, 9.0, 12.0, draws=[10.5, 10.6, 10.7, 10.8] * 25),
            score(10.0, 8.5, 11.5, draws=[10.0, 10.1, 10.1, 10.2] * 25),
            False,
            "worse beyond",
        ),
        (
            "base/old",
            score(10.1, 9.0, 12.0, draws=[9.9, 10.3, 10.0, 10.2] * 25),
            score(10.0, 8.5, 11.5, draws=[10.1, 10.0, 10.2, 9.8] * 25),
            True,
            "not worse",
        ),
    ],
)
def test_the_gate_compares_with_the_interval(current, candidate, served, promoted, why):
    decision = decide("base/new", current, STEPS, "euler", candidate, served)
    assert isinstance(decision, PromotionDecision)
    assert decision.promoted is promoted, decision.reason
    assert why in decision.reason
    paired = candidate is not None and served is not None and candidate.draws and current != "base/new"
    assert (decision.difference is not None) == bool(paired)


def test_promote_moves_the_pointer_only_when_the_candidate_is_not_worse(local_store):
    store = local_store
    base = commit_generator(store, "base", "b1", "flow")
    student = commit_generator(store, "consistency", "c1", "consistency")
    worse = commit_generator(store, "consistency", "c2", "consistency")
    unevaluated = commit_generator(store, "consistency", "c3", "consistency")
    first = commit_evaluation(
        store,
        "e1",
        [base, student],
        [
            row(base, "euler", STEPS, 30.0),
            row(base, "heun", STEPS, 20.0),
            row(base, "euler", 8, 5.0),
            row(student, "consistency", STEPS, 12.0),
            row(student, "consistency", 1, 14.0),
        ],
    )

    # Nothing served yet: the first candidate goes in.
    decision = promote(store, base.ref, first.ref, served_steps=STEPS)
    assert decision.promoted and decision.current is None
    assert store.get_pointer("serving/current") == base.ref

    # The base model is served with Euler, so its FID is the Euler one (30), not Heun's 20 or 8 steps' 5.
    decision = promote(store, student.ref, first.ref, served_steps=STEPS)
    assert decision.promoted, decision.reason
    assert (decision.candidate_fid, decision.current_fid, decision.sampler) == (12.0, 30.0, "consistency")
    assert store.get_pointer("serving/current") == student.ref

    # A later run's evaluation that did not score the served model: its FID comes from e1, and the
    # intervals of two evaluations are compared: [13.5, 14.5] lies above [11.5, 12.5].
    close = commit_generator(store, "consistency", "c4", "consistency")
    second = commit_evaluation(
        store,
        "e2",
        [worse, unevaluated, close],
        [
            row(worse, "consistency", STEPS, 14.0),
            row(unevaluated, "consistency", 1, 1.0),
            row(close, "consistency", STEPS, 12.6),
        ],
    )
    decision = promote(store, worse.ref, second.ref, served_steps=STEPS)
    assert not decision.promoted and "worse beyond the interval" in decision.reason
    assert decision.current_fid == 12.0 and decision.difference is None
    assert store.get_pointer("serving/current") == student.ref

    # Measured another way (another extractor: other data, another feature space): no comparison.
    other_space = commit_evaluation(
        store, "e3", [worse], [{**row(worse, "consistency", STEPS, 99.0), "extractor": "classifier/other"}]
    )
    decision = promote(store, worse.ref, other_space.ref, served_steps=STEPS)
    assert decision.promoted and decision.current_fid is None and "no FID" in decision.reason
    store.put_pointer("serving/current", student.ref)

    # A worse point value inside the intervals is no result: it passes.
    decision = promote(store, close.ref, second.ref, served_steps=STEPS)
    assert decision.promoted, decision.reason
    assert store.get_pointer("serving/current") == close.ref
    worse = close

    # Evaluated only at 1 step, not at the served 2: refused, whatever its 1-step FID.
    decision = promote(store, unevaluated.ref, second.ref, served_steps=STEPS)
    assert not decision.promoted and "no finite FID at 2 step(s)" in decision.reason
    assert store.get_pointer("serving/current") == worse.ref


def test_promote_takes_a_lookup_function_and_checks_what_it_promotes(local_store):
    store = local_store
    a = commit_generator(store, "reflow", "r1", "flow")
    b = commit_generator(store, "reflow", "r2", "flow")
    fids = {(a.ref, 4, "heun"): score(9.0), (b.ref, 4, "heun"): score(8.0)}
    calls = []

    def lookup(ref, steps, sampler):
        calls.append((ref, steps, sampler))
        return fids.get((ref, steps, sampler))

    assert promote(store, a.ref, lookup, served_steps=4, solver="heun").promoted
    assert promote(store, b.ref, lookup, served_steps=4, solver="heun").promoted
    assert (a.ref, 4, "heun") in calls and store.get_pointer("serving/current") == b.ref

    vae = store.begin("vae", "v", config={})
    vae.write_json("note", {})
    vae_manifest = vae.commit(metrics={})
    with pytest.raises(ValueError, match="not a generator"):
        promote(store, vae_manifest.ref, lookup, served_steps=4)
    with pytest.raises(ValueError, match="pass an 'evaluate' ref"):
        promote(store, a.ref, vae_manifest.ref, served_steps=4)


def reference(name: str, fid: float, accuracy: float | None = None) -> dict:
    """A floor or ceiling row, as the evaluation writes them."""
    values = dict.fromkeys(COLUMNS)
    values.update(model=name, stage_key="ingest/i", sampler=REFERENCE, steps=0, nfe=0, n=100, extractor="test", fid=fid)
    values["class_accuracy"] = accuracy
    return values


def commit_labelled(store: Store, stage: str, key: str, family: str, num_classes: int = 10):
    with store.begin(stage, key, config={"key": key}) as writer:
        writer.write_json("note", {"what": "promotion test model"})
        card = GeneratorCard(
            family=family, steps=0, latent_shape=(2, 4, 4), num_classes=num_classes, latent_scale=1.0, vae_ref="vae/v"
        )
        return writer.commit(metrics=card.to_metrics())


def test_the_absolute_bar_refuses_a_model_that_did_not_learn_even_with_nothing_served(local_store):
    store, bar = local_store, Bar(min_accuracy_over_chance=2.0, max_excess_over_ceiling=10.0)
    near_chance = commit_labelled(store, "consistency", "chance", "consistency")
    far_from_ceiling = commit_labelled(store, "consistency", "far", "consistency")
    learned = commit_labelled(store, "consistency", "learned", "consistency")
    floor, ceiling = reference(FLOOR, 7.4, 0.99), reference(CEILING, 14.5, 0.93)
    rows = [
        floor,
        ceiling,
        # Lowest FID at the served steps over the guidance column: the 2.0 row, class accuracy 0.15.
        {**row(near_chance, "consistency", STEPS, 60.0), "class_accuracy": 0.15, "guidance": 2.0},
        {**row(near_chance, "consistency", STEPS, 90.0), "class_accuracy": 0.9, "guidance": 4.0},
        {**row(far_from_ceiling, "consistency", STEPS, 364.0), "class_accuracy": 0.6},
        {**row(learned, "consistency", STEPS, 60.0), "class_accuracy": 0.6},
    ]
    evaluation = commit_evaluation(store, "e-bar", [near_chance, far_from_ceiling, learned], rows)

    decision = promote(store, near_chance.ref, evaluation.ref, served_steps=STEPS, bar=bar)
    assert not decision.promoted and decision.below_bar and decision.current is None
    assert "class accuracy 0.15 at the served 2 step(s) with consistency (chance 0.10, real images 0.99" in (
        decision.reason
    )
    assert "has not learned the data; check its teacher's probe first; then raise consistency.steps" in decision.reason
    assert store.get_pointer("serving/current") is None  # nothing is served that did not learn

    # FID 364: 356.6 above the floor, 50x the ceiling's 7.1 (bar 10x).
    decision = promote(store, far_from_ceiling.ref, evaluation.ref, served_steps=STEPS, bar=bar)
    assert not decision.promoted and decision.below_bar and "50.2x the VAE ceiling's excess 7.1" in decision.reason
    assert store.get_pointer("serving/current") is None

    # Above both bars (0.6 >= 0.2; 52.6 <= 71): promoted; then, served, a model below the bar is
    # refused before any comparison, even though its FID is no worse than the served one.
    decision = promote(store, learned.ref, evaluation.ref, served_steps=STEPS, bar=bar)
    assert decision.promoted and not decision.below_bar, decision.reason
    decision = promote(store, near_chance.ref, evaluation.ref, served_steps=STEPS, bar=bar)
    assert not decision.promoted and decision.below_bar and decision.current == learned.ref
    assert "vs the served" not in decision.reason and decision.difference is None  # no comparison ran
    assert store.get_pointer("serving/current") == learned.ref

    # Without the bar, the same near-chance model passes the comparison (the old gate).
    assert promote(store, near_chance.ref, evaluation.ref, served_steps=STEPS).promoted


def test_the_bar_needs_an_evaluated_candidate_and_ignores_what_was_not_measured():
    bar = Bar(2.0, 10.0)
    unlabelled = score(60.0)
    assert decide("base/new", None, STEPS, "euler", unlabelled, None, bar=bar, chance=None).promoted
    refused = decide("base/new", None, STEPS, "euler", None, None, bar=bar, chance=0.1)
    assert not refused.promoted and refused.below_bar and "nothing shows it learned" in refused.reason
    off = Bar(0.0, None)
    low = Scored(500.0, None, None, "evaluate/e", class_accuracy=0.1, floor_fid=7.0, ceiling_fid=8.0)
    assert decide("base/new", None, STEPS, "euler", low, None, bar=off, chance=0.1).promoted
    assert not decide("base/new", None, STEPS, "euler", low, None, bar=bar, chance=0.1).promoted


def test_promotion_records_the_candidates_best_guidance_with_the_pointer(local_store):
    """The candidate is read at its best scale at the served steps (with its sampler), and that
    scale goes into the pointer's record, where serving takes it as its default guidance."""
    store = local_store
    base = commit_generator(store, "base", "g1", "flow")
    rows = [
        {**row(base, "euler", STEPS, 30.0), "guidance": 1.0},
        {**row(base, "euler", STEPS, 18.0), "guidance": 2.0},
        {**row(base, "euler", STEPS, 22.0), "guidance": 4.0},
        {**row(base, "euler", 8, 5.0), "guidance": 4.0},  # better, but not at the served steps
        {**row(base, "heun", STEPS, 10.0), "guidance": 4.0},  # better, but not how it is served
    ]
    evaluation = commit_evaluation(store, "eg", [base], rows)
    decision = promote(store, base.ref, evaluation.ref, served_steps=STEPS)
    assert decision.promoted and (decision.candidate_fid, decision.guidance) == (18.0, 2.0)
    assert decision.as_dict()["guidance"] == 2.0
    record = store.pointer_record("serving/current")
    assert record["ref"] == base.ref and record["guidance"] == 2.0
    assert store.get_pointer("serving/current") == base.ref  # readers of the ref alone are unaffected
    with pytest.raises(ValueError, match="overwrite the pointer's own fields"):
        store.put_pointer("serving/current", base.ref, about={"ref": "base/other"})


# --------------------------------------------------------------------------- champion against challenger


def commit_paired_evaluation(store: Store, key: str, scored: list):
    """One evaluation that scored several models on the same test images and seeds: their rows and
    their paired bootstrap draws. ``scored``: [(manifest, FID, draws)]."""
    rows, draws = [], []
    for manifest, fid, model_draws in scored:
        values = {**row(manifest, "consistency", STEPS, fid), "model": f"consistency-{manifest.key}"}
        rows.append(values)
        draws.append({"row": f"consistency-{manifest.key}|consistency|{STEPS}", "draws": list(model_draws)})
    with store.begin("evaluate", key, config={"key": key}, inputs=[m for m, _, _ in scored]) as writer:
        writer.write_table("metrics", pa.Table.from_pylist(rows))
        writer.write_table(DRAWS, pa.Table.from_pylist(draws))
        return writer.commit(metrics={"rows": len(rows)})


def test_the_challenger_is_promoted_over_the_champion_only_when_not_worse_on_paired_draws(local_store):
    """Champion and challenger scored by one evaluation: the paired interval decides, and the
    decision carries every figure (both FIDs with intervals, the difference, where they come from);
    a promotion is appended to the champion history, a refusal leaves pointer and history alone."""
    store = local_store
    champion = commit_generator(store, "consistency", "champ", "consistency")
    better = commit_generator(store, "consistency", "better", "consistency")
    worse = commit_generator(store, "consistency", "worse", "consistency")
    first = commit_paired_evaluation(store, "e-first", [(champion, 12.0, [12.0, 12.2, 11.8, 12.1] * 25)])
    assert promote(store, champion.ref, first.ref, served_steps=STEPS, run_id="run-1").promoted
    assert [e["ref"] for e in read_history(store, "serving/current")] == [champion.ref]

    wobble = [0.1, -0.1, 0.05, -0.05] * 25  # the same test images and seeds: the draws move together
    week = commit_paired_evaluation(
        store,
        "e-week",
        [
            (champion, 12.0, [12.0 + w for w in wobble]),
            (better, 11.9, [11.9 + w + 0.01 * (i % 3) for i, w in enumerate(wobble)]),
            (worse, 12.4, [12.4 + w + 0.01 * (i % 3) for i, w in enumerate(wobble)]),
        ],
    )

    refused = promote(store, worse.ref, week.ref, served_steps=STEPS, run_id="run-2")
    assert not refused.promoted and "worse beyond the interval" in refused.reason
    assert (refused.current, refused.current_fid, refused.candidate_fid) == (champion.ref, 12.0, 12.4)
    assert refused.candidate_evaluation == refused.current_evaluation == week.ref  # paired, not two evaluations
    assert refused.difference is not None and refused.difference[0] > 0
    assert refused.candidate_interval == (11.9, 12.9) and refused.current_interval == (11.5, 12.5)
    assert store.get_pointer("serving/current") == champion.ref
    assert len(read_history(store, "serving/current")) == 1  # a refusal moves nothing, logs nothing

    promoted = promote(store, better.ref, week.ref, served_steps=STEPS, run_id="run-3")
    assert promoted.promoted and "not worse beyond the interval" in promoted.reason, promoted.reason
    assert promoted.difference is not None and promoted.difference[0] <= 0
    assert store.get_pointer("serving/current") == better.ref
    latest = read_history(store, "serving/current")[-1]
    assert {k: latest[k] for k in ("action", "ref", "previous", "fid", "fid_low", "fid_high", "run_id")} == {
        "action": "promote",
        "ref": better.ref,
        "previous": champion.ref,
        "fid": 11.9,
        "fid_low": 11.4,
        "fid_high": 12.4,
        "run_id": "run-3",
    }
    assert latest["evaluation"] == week.ref and latest["steps"] == STEPS and latest["at"]


def test_the_gate_is_handed_the_student_with_the_lower_fid_at_the_served_steps(tmp_path):
    from workers.stages.s11_promote import pick_candidate

    store = Store.open(str(tmp_path / "store"))
    consistency = commit_generator(store, "consistency", "c", "consistency")
    flowmap = commit_generator(store, "flowmap", "f", "flowmap")
    students = [consistency.ref, flowmap.ref]
    rows = [
        row(consistency, "consistency", STEPS, 30.0),
        row(flowmap, "flowmap", STEPS, 20.0),
        row(flowmap, "flowmap", 1, 50.0),  # another step count: not what is served
    ]
    evaluation = commit_evaluation(store, "e", [consistency, flowmap], rows)
    assert pick_candidate(store, students, evaluation.ref, STEPS) == flowmap.ref
    assert pick_candidate(store, students, evaluation.ref, 1) == flowmap.ref  # the only one scored at 1
    worse = commit_evaluation(store, "w", [consistency, flowmap], [*rows[:1], row(flowmap, "flowmap", STEPS, 40.0)])
    assert pick_candidate(store, students, worse.ref, STEPS) == consistency.ref
    none = commit_evaluation(store, "n", [consistency, flowmap], [row(consistency, "consistency", 8, 1.0)])
    assert pick_candidate(store, students, none.ref, STEPS) == consistency.ref  # the first: the gate says why
    # and the gate takes the picked flow-map student like any other
    decision = promote(store, flowmap.ref, evaluation.ref, STEPS)
    assert decision.promoted and decision.sampler == "flowmap" and store.get_pointer("serving/current") == flowmap.ref
