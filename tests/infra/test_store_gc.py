"""``fewstep gc`` never deletes what is still needed: it fails closed on anything unreadable, treats
running runs and pinned serves as roots, ages attempts by their newest file, re-checks each item
right before deleting it, and collects the temp files of crashed writes (issue 12, items 1, 2, 7)."""

from __future__ import annotations

import os
import sys
import uuid
from datetime import timedelta

import pyarrow as pa
import pytest

import infra.gc
from infra.errors import GcRefused
from infra.gc import CHECKPOINTS, STAGING, TEMP, UNREFERENCED, apply_gc, clock, plan_gc
from infra.manifest import Manifest
from infra.store import Store

sys.path.insert(0, os.path.dirname(__file__))
from s3_proxy import S3Proxy  # noqa: E402

LATER = timedelta(hours=2)  # what the tests write "now" is two hours old at clock() + LATER


def commit(store: Store, stage: str, inputs=(), seed: int = 0) -> Manifest:
    config = {"stage": stage, "seed": seed}
    key = store.stage_key(stage, config, inputs)
    with store.begin(stage, key, config=config, inputs=inputs) as writer:
        writer.write_table("rows", pa.table({"v": list(range(10))}))
        return writer.commit({"rows": 10})


def chain(store: Store) -> list[Manifest]:
    """ingest -> vae -> latents -> base, as a pipeline leaves them."""
    manifests = [commit(store, "ingest")]
    for stage in ("vae", "latents", "base"):
        manifests.append(commit(store, stage, [manifests[-1]]))
    return manifests


def crashed_attempt(store: Store, stage: str = "crashed", key: str = "0000000000000000") -> str:
    try:
        with store.begin(stage, key, config={}) as writer:
            writer.write_bytes("half.bin", b"x" * 100)
            raise RuntimeError("killed")
    except RuntimeError:
        return writer.prefix


def ref_of(item) -> str:
    """``stage/key`` of a staging, checkpoints or unreferenced item (read from its path); a temp file's path."""
    parts = item.path.split("/")
    for folder in ("stages", "checkpoints"):
        if item.kind != TEMP and folder in parts:
            at = len(parts) - 1 - parts[::-1].index(folder)
            return f"{parts[at + 1]}/{parts[at + 2]}"
    return item.path


def kinds(plan) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for item in plan.items:
        found.setdefault(item.kind, set()).add(ref_of(item))
    return found


def deleted_nothing_committed(store: Store, manifests: list[Manifest]) -> None:
    for manifest in manifests:
        assert store.get(manifest.stage, manifest.key) is not None, f"{manifest.ref} was deleted"
        store.verify(manifest)


# ---------------------------------------------------------------------------------------
# Item 1: fail closed


def test_a_damaged_manifest_stops_every_unreferenced_delete(store):
    ingest, vae, latents, base = chain(store)
    orphan = commit(store, "orphan")
    store.put_pointer("serving/current", base.ref)
    leftover = crashed_attempt(store)
    path = f"{store.stage_dir(base.stage, base.key)}/manifest.json"
    store.fs.pipe_file(path, store.fs.cat_file(path).replace(b'"rows": 10', b'"rows": 11'))  # IntegrityError

    plan = plan_gc(store, now=clock() + LATER)
    assert UNREFERENCED not in kinds(plan)  # today: ingest, vae, latents (and orphan) are listed
    assert any(line.startswith(f"manifest {base.ref}: ") and "modified after commit" in line for line in plan.damaged)
    assert "nothing is treated as unreferenced" in plan.note and "1 record(s) cannot be read" in plan.note
    # A staging leftover of a stage with no manifest is provably abandoned: still collected.
    assert kinds(plan)[STAGING] == {"crashed/0000000000000000"}

    result = apply_gc(store, plan, now=clock() + LATER)
    assert [item.kind for item in result.removed] == [STAGING]
    deleted_nothing_committed(store, [ingest, vae, latents, orphan])
    assert store.backend.list_files(leftover) == {}


def test_a_manifest_s3_cannot_serve_after_retries_stops_every_unreferenced_delete(s3_server, s3_uri, monkeypatch):
    """The issue's reproduction: the served model's manifest answers 503 on every try."""
    monkeypatch.setattr("infra.errors.time.sleep", lambda s: None)
    store = Store.open(s3_uri)
    ingest, vae, latents, base = chain(store)
    store.put_pointer("serving/current", base.ref)
    proxy = S3Proxy(s3_server.endpoint_url, s3_server.client(), unavailable=(f"stages/base/{base.key}/manifest.json",))
    try:
        flaky = Store.open(s3_uri, endpoint_url=proxy.endpoint_url)
        plan = plan_gc(flaky, now=clock() + LATER)
        assert plan.items == ()
        assert any(line.startswith(f"manifest {base.ref}: ") and "transient errors" in line for line in plan.damaged)
        apply_gc(flaky, plan, now=clock() + LATER)
    finally:
        proxy.close()
    deleted_nothing_committed(store, [ingest, vae, latents, base])


@pytest.mark.parametrize("folder", ["runs", "pointers", "pins"])
def test_an_unreadable_root_record_stops_every_unreferenced_delete(local_store, folder):
    store = local_store
    kept = commit(store, "kept")
    orphan = commit(store, "orphan")
    store.put_pointer("serving/current", kept.ref)
    store.backend.write_bytes(store.backend.join(folder, "hand-edited.json"), b'{"ref": "orphan/')  # truncated
    plan = plan_gc(store, now=clock() + LATER)
    assert UNREFERENCED not in kinds(plan)
    assert any(line.startswith(f"{folder[:-1]} hand-edited: ") and "not a valid" in line for line in plan.damaged)
    apply_gc(store, plan, now=clock() + LATER)
    deleted_nothing_committed(store, [kept, orphan])


# ---------------------------------------------------------------------------------------
# Item 2: running runs, ages, re-checks, the floor, pins


def test_a_running_run_protects_everything_until_it_finishes(store):
    ingest = commit(store, "ingest")  # reused by the running run: no record names it yet
    served = commit(store, "served")
    store.put_pointer("serving/current", served.ref)
    leftover = crashed_attempt(store)
    store.begin_run("run-1", {"preset": "quick"})
    store.heartbeat_run("run-1", {"images": ingest.ref})

    # Two hours on, with a heartbeat that is still fresh (stale only after 3 h here).
    plan = plan_gc(store, now=clock() + LATER, run_stale_s=3 * 3600)
    assert plan.running == ("run-1",) and plan.items == ()
    assert "run run-1 is running" in plan.note

    # The same heartbeat seen as stale (the run died): its leftovers go, its refs stay roots.
    stale = plan_gc(store, now=clock() + LATER)
    assert stale.running == () and kinds(stale) == {STAGING: {"crashed/0000000000000000"}}

    orphan = commit(store, "orphan")
    store.finish_run("run-1", {"images": ingest.ref})
    plan = plan_gc(store, now=clock() + LATER, run_stale_s=3 * 3600)
    assert plan.running == () and kinds(plan) == {STAGING: {"crashed/0000000000000000"}, UNREFERENCED: {orphan.ref}}
    apply_gc(store, plan, now=clock() + LATER)
    assert store.get(orphan.stage, orphan.key) is None and store.backend.list_files(leftover) == {}
    deleted_nothing_committed(store, [ingest, served])
    run = store.list_runs()[0]
    assert (run["status"], run["refs"], run["info"]) == ("finished", {"images": ingest.ref}, {"preset": "quick"})


def test_keep_alive_heartbeats_from_a_thread(local_store):
    store = local_store
    store.begin_run("run-2")
    first = store.list_runs()[0]["heartbeat_at"]
    with store.keep_alive("run-2", every_s=0.05):
        deadline = clock() + timedelta(seconds=10)
        while store.list_runs()[0]["heartbeat_at"] == first and clock() < deadline:
            pass
    assert store.list_runs()[0]["heartbeat_at"] > first
    store.finish_run("run-2", {}, status="failed")
    store.heartbeat_run("run-2")  # a late beat does not revive a finished run
    assert store.list_runs()[0]["status"] == "failed"


def test_an_attempt_is_as_old_as_its_newest_file(store):
    """An attempt started long ago that is still writing is not abandoned."""
    attempt = "20200101T000000Z-0123456789ab"  # started years ago, by its name
    prefix = f"{store.stage_dir('base', 'a' * 16)}/attempts/{attempt}"
    store.backend.write_bytes(f"{prefix}/part-0.parquet", b"still being written")
    assert plan_gc(store).items == ()  # today: "attempt of base/aaaa... of unknown age" is listed
    assert kinds(plan_gc(store, now=clock() + LATER)) == {STAGING: {f"base/{'a' * 16}"}}


def test_gc_re_checks_each_item_right_before_deleting_it(store, monkeypatch):
    """A stage that commits while gc deletes something else keeps its files."""
    leftover = crashed_attempt(store, "a-crashed")
    writer = store.begin("b-slow", "1111111111111111", config={})
    writer.write_table("rows", pa.table({"v": [1, 2, 3]}))
    plan = plan_gc(store, now=clock() + LATER)
    assert [ref_of(item) for item in plan.items] == ["a-crashed/0000000000000000", "b-slow/1111111111111111"]

    remove = store.backend.remove
    committed = []

    def commit_while_removing(path: str) -> None:  # the slow stage commits while gc works
        if not committed:
            committed.append(writer.commit())
        remove(path)

    monkeypatch.setattr(store.backend, "remove", commit_while_removing)
    result = apply_gc(store, plan, now=clock() + LATER)
    assert [ref_of(item) for item in result.removed] == ["a-crashed/0000000000000000"]
    assert [(ref_of(item), why) for item, why in result.kept] == [
        ("b-slow/1111111111111111", "b-slow/1111111111111111 committed this attempt since the plan")
    ]
    assert store.read_table(committed[0], "rows").num_rows == 3  # today: IntegrityError, 'rows' is missing
    assert store.backend.list_files(leftover) == {}


def test_a_minimum_age_below_the_floor_is_refused(local_store):
    for min_age_s in (0, 60, 899):
        with pytest.raises(GcRefused, match=r"below the floor of 0\.25 h.*--min-age-hours 0\.25"):
            plan_gc(local_store, min_age_s=min_age_s)
    assert plan_gc(local_store, min_age_s=900).items == ()


def test_a_pinned_serve_is_a_root(store):
    served = commit(store, "served")
    upstream = commit(store, "upstream")
    pinned = commit(store, "pinned", [upstream])
    store.put_pointer("serving/current", served.ref)
    store.pin("serve-host-123", pinned.ref)
    assert store.list_pins() == {"serve-host-123": pinned.ref}
    plan = plan_gc(store, now=clock() + LATER)
    assert pinned.ref in plan.roots and UNREFERENCED not in kinds(plan)

    store.unpin("serve-host-123")
    assert store.list_pins() == {}
    assert kinds(plan_gc(store, now=clock() + LATER)) == {UNREFERENCED: {pinned.ref, upstream.ref}}


# ---------------------------------------------------------------------------------------
# Item 7: temp files of crashed writes


def test_temp_files_of_crashed_writes_are_collected_when_old(local_store):
    store = local_store
    manifest = commit(store, "ingest")
    store.put_pointer("serving/current", manifest.ref)
    # What LocalBackend._write_temp leaves when its process dies before the link or rename.
    temps = [
        f"{store.stage_dir('ingest', manifest.key)}/.manifest.json.{uuid.uuid4().hex}.tmp",
        store.backend.join("pointers", "serving", f".current.json.{uuid.uuid4().hex}.tmp"),
        f"{store.checkpoints('base', 'k').step_dir(3)}/.manifest.json.{uuid.uuid4().hex}.tmp",
    ]
    for path in temps:
        store.backend.write_bytes(path, b'{"half": ')
    assert plan_gc(store).items == ()  # young: the write may still be going
    plan = plan_gc(store, now=clock() + LATER)
    assert kinds(plan) == {TEMP: set(temps)}  # today: never listed
    result = apply_gc(store, plan, now=clock() + LATER)
    assert len(result.removed) == 3 and not any(os.path.exists(path) for path in temps)
    assert store.get_pointer("serving/current") == manifest.ref
    deleted_nothing_committed(store, [manifest])
    assert store.backend.list_files(store.backend.join("pointers")).keys() == {"serving/current.json"}


def test_checkpoints_of_a_committed_stage_are_collected_only_when_old(local_store):
    store = local_store
    manifest = commit(store, "base")
    store.put_pointer("serving/current", manifest.ref)
    store.checkpoints("base", manifest.key).save(1, {}, {"step": 1})
    assert plan_gc(store, now=clock() + timedelta(minutes=30)).items == ()
    assert kinds(plan_gc(store, now=clock() + LATER)) == {CHECKPOINTS: {manifest.ref}}


def test_gc_clock_is_the_one_tests_move(monkeypatch, local_store):
    later = clock() + LATER
    monkeypatch.setattr(infra.gc, "clock", lambda: later)
    crashed_attempt(local_store)
    assert kinds(plan_gc(local_store)) == {STAGING: {"crashed/0000000000000000"}}
