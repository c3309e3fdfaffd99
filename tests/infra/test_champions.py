"""The champion history of the served pointer, and rollback by compare-and-swap, on a local folder and on S3."""

from __future__ import annotations

import json

import pytest

from infra.champions import champion_stack, read_history, record_promotion, rollback
from infra.errors import IntegrityError, NoPreviousChampion, PointerMoved
from infra.store import Store

POINTER = "serving/current"


def commit(store: Store, key: str):
    with store.begin("consistency", key, config={"key": key}) as writer:
        writer.write_json("note", {"key": key})
        return writer.commit({})


def promote_by_hand(store: Store, ref: str, fid: float, guidance: float | None = None) -> None:
    """What promotion does after its gate: move the pointer by CAS, then log the move."""
    previous = store.get_pointer(POINTER)
    store.put_pointer(POINTER, ref, expect=previous, about={"guidance": guidance} if guidance is not None else None)
    record_promotion(
        store,
        POINTER,
        ref,
        previous,
        {"fid": fid, "fid_low": fid - 1, "fid_high": fid + 1, "guidance": guidance, "steps": 1},
    )


def test_rollback_puts_the_previous_champion_back_and_walks_the_history(store):
    week1, week2, week3 = (commit(store, f"w{i}") for i in (1, 2, 3))
    promote_by_hand(store, week1.ref, 20.0, guidance=2.0)
    promote_by_hand(store, week2.ref, 15.0, guidance=4.0)
    promote_by_hand(store, week3.ref, float("nan"))  # no FID: logged as None, never as NaN
    history = read_history(store, POINTER)
    assert [(e["action"], e["ref"], e["previous"]) for e in history] == [
        ("promote", week1.ref, None),
        ("promote", week2.ref, week1.ref),
        ("promote", week3.ref, week2.ref),
    ]
    assert history[2]["fid"] is None and history[0]["fid"] == 20.0

    done = rollback(store, POINTER)
    assert (done.from_ref, done.to_ref, done.fid, done.guidance) == (week3.ref, week2.ref, 15.0, 4.0)
    assert store.get_pointer(POINTER) == week2.ref
    assert store.pointer_record(POINTER)["guidance"] == 4.0  # serving's default scale comes back with it
    last = read_history(store, POINTER)[-1]
    assert (last["action"], last["ref"], last["previous"], last["fid"]) == ("rollback", week2.ref, week3.ref, 15.0)

    # A second rollback goes one further back, not back and forth.
    assert rollback(store, POINTER).to_ref == week1.ref
    assert store.pointer_record(POINTER) == {**store.pointer_record(POINTER), "ref": week1.ref, "guidance": 2.0}
    with pytest.raises(NoPreviousChampion, match="is the first champion recorded"):
        rollback(store, POINTER)
    assert store.get_pointer(POINTER) == week1.ref


def test_rollback_refuses_clearly_without_a_history_to_follow(store):
    with pytest.raises(NoPreviousChampion, match="is not set .* nothing is served"):
        rollback(store, POINTER)
    served, other = commit(store, "s"), commit(store, "o")
    store.put_pointer(POINTER, served.ref)  # moved by hand: nothing logged
    with pytest.raises(NoPreviousChampion, match="does not record how it got there"):
        rollback(store, POINTER)
    # A history that starts while something was served: that model is the one to go back to.
    promote_by_hand(store, other.ref, 9.0)
    assert [e["ref"] for e in champion_stack(read_history(store, POINTER))] == [served.ref, other.ref]
    store.put_pointer(POINTER, served.ref)  # moved by hand after the log: the log no longer ends at it
    with pytest.raises(NoPreviousChampion, match="does not record how it got there"):
        rollback(store, POINTER)
    # The next promotion replaced the hand-moved model: rollback goes back to it, not further.
    third = commit(store, "t")
    promote_by_hand(store, third.ref, 8.0)
    assert rollback(store, POINTER).to_ref == served.ref
    assert rollback(store, POINTER).to_ref == other.ref


def test_rollback_loses_to_a_pointer_that_moved_meanwhile(store):
    """Rollback reads the pointer, decides, and swaps against what it read: a promotion that lands
    in between wins, and the rollback writes nothing."""
    a, b, c = commit(store, "a"), commit(store, "b"), commit(store, "c")
    promote_by_hand(store, a.ref, 3.0)
    promote_by_hand(store, b.ref, 2.0)
    other = Store.open(store.uri)  # another process promoting at the same time

    class Racing(Store):
        def get_pointer(self, name):
            seen = super().get_pointer(name)
            other.put_pointer(POINTER, c.ref, expect=b.ref)  # lands right after the rollback read
            return seen

    with pytest.raises(PointerMoved, match=f"points at {c.ref}, not at {b.ref}"):
        rollback(Racing(store.backend), POINTER)
    assert store.get_pointer(POINTER) == c.ref
    assert [e["action"] for e in read_history(store, POINTER)] == ["promote", "promote"]


def test_a_broken_history_file_is_named(local_store):
    a = commit(local_store, "a")
    promote_by_hand(local_store, a.ref, 1.0)
    path = local_store.backend.join("history", "serving", "current.json")
    local_store.backend.replace(path, json.dumps({"entries": [{"action": "promote"}]}).encode())
    with pytest.raises(IntegrityError, match="champion history of 'serving/current' at .* is not valid"):
        rollback(local_store, POINTER)
