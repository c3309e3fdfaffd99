"""``fewstep promote`` as a user runs it: roll the served model back, promote one by hand through the gate."""

from __future__ import annotations

import subprocess
import sys

from infra.champions import read_history
from infra.store import Store
from tests.flows.promotion_fixtures import commit_evaluation, commit_generator
from workers.stages.s11_promote import promote

STEPS = 1  # the default preset serves 1 step; consistency models are read at it


def fewstep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from flows.cli import main; main()", *args], capture_output=True, text=True, timeout=300
    )


def test_rollback_from_the_command_line_and_its_errors(tmp_path):
    uri = str(tmp_path / "store")
    store = Store.open(uri)

    # Nothing served: a one-line error, no traceback.
    empty = fewstep("promote", "--rollback", "--store", uri)
    assert empty.returncode == 2 and "nothing is served, so nothing to roll back" in empty.stderr, empty.stderr
    assert "Traceback" not in empty.stderr and len(empty.stderr.strip().splitlines()) == 1

    old, new = commit_generator(store, "old"), commit_generator(store, "new")
    wobble = [0.1, -0.1, 0.05, -0.05] * 25
    week = commit_evaluation(
        store, "week", [(old, 20.0, [20.0 + w for w in wobble]), (new, 19.0, [19.0 + w for w in wobble])]
    )
    assert promote(store, old.ref, week.ref, served_steps=STEPS).promoted
    first = fewstep("promote", "--rollback", "--store", uri)
    assert first.returncode == 2 and f"{old.ref} is the first champion recorded" in first.stderr, first.stderr
    assert promote(store, new.ref, week.ref, served_steps=STEPS).promoted
    status = fewstep("status", "--store", uri)
    assert f"serving/current -> {new.ref}  (previous champion {old.ref}: `fewstep promote --rollback`)" in (
        status.stdout
    ), status.stdout

    done = fewstep("promote", "--rollback", "--store", uri)
    assert done.returncode == 0, done.stderr
    assert f"rolled back serving/current: {new.ref} -> {old.ref} (FID 20 when it was promoted)" in done.stdout
    assert store.get_pointer("serving/current") == old.ref
    assert [e["action"] for e in read_history(store, "serving/current")] == ["promote", "promote", "rollback"]

    again = fewstep("promote", "--rollback", "--store", uri)
    assert (
        again.returncode == 2 and "is the first champion recorded" in again.stderr and "Traceback" not in again.stderr
    )

    neither = fewstep("promote", "--store", uri)
    assert (
        neither.returncode == 2 and "`fewstep promote --rollback`, or `fewstep promote --model REF`" in neither.stderr
    )


def test_promote_by_hand_goes_through_the_same_gate(tmp_path):
    uri = str(tmp_path / "store")
    store = Store.open(uri)
    served, worse, better = (
        commit_generator(store, "served"),
        commit_generator(store, "worse"),
        commit_generator(store, "better"),
    )
    wobble = [0.1, -0.1, 0.05, -0.05] * 25
    week = commit_evaluation(
        store,
        "week",
        [(m, fid, [fid + w for w in wobble]) for m, fid in ((served, 20.0), (worse, 23.0), (better, 18.0))],
    )
    # The default preset's bar: unlabelled models have no accuracy bar, and no floor/ceiling rows: no FID bar.
    first = fewstep("promote", "--model", served.ref, "--store", uri)
    assert first.returncode == 0 and f"(nothing) -> {served.ref}" in first.stdout, first.stdout + first.stderr

    refused = fewstep("promote", "--model", worse.ref, "--store", uri)
    assert (
        refused.returncode == 1 and "not promoted" in refused.stdout and "worse beyond the interval" in refused.stdout
    )
    assert store.get_pointer("serving/current") == served.ref

    promoted = fewstep("promote", "--model", better.ref, "--evaluation", week.ref, "--store", uri)
    assert promoted.returncode == 0 and f"{served.ref} -> {better.ref}" in promoted.stdout, promoted.stderr
    assert [e["run_id"] for e in read_history(store, "serving/current")] == [None, None]

    missing = fewstep("promote", "--model", "consistency/nope", "--store", uri)
    assert missing.returncode == 2 and "consistency/nope" in missing.stderr and "Traceback" not in missing.stderr
    not_a_model = fewstep("promote", "--model", week.ref, "--evaluation", week.ref, "--store", uri)
    assert not_a_model.returncode == 2 and "not a generator" in not_a_model.stderr, not_a_model.stderr
