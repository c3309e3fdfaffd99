"""Bytes are what the manifest says, wherever they are read from (issue 12, items 4-7): verified
paths for Ray Data, manifest paths that cannot leave the stage folder, fsync before publish,
pointer moves by compare-and-swap, and one clear line for a hand-broken run or pointer file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from infra.errors import IntegrityError, PointerMoved
from infra.manifest import canonical_json, sha256_hex
from infra.store import Store

ROOT = Path(__file__).resolve().parents[2]


def commit_parts(store: Store, parts: int = 2):
    """A folder of Parquet files, as Ray Data's write_parquet leaves it."""
    with store.begin("latents", "0123456789abcdef", config={}) as writer:
        store.fs.makedirs(f"{writer.prefix}/latents", exist_ok=True)
        for i in range(parts):
            pq.write_table(
                pa.table({"v": [float(i)] * 100}),
                f"{writer.prefix}/latents/part-{i}.parquet",
                filesystem=store.pa_filesystem,
            )
        writer.add_files(["latents"])
        return writer.commit()


# ---------------------------------------------------------------------------------------
# Item 4: what Ray Data reads is verified first


def test_verified_paths_check_every_file_before_an_engine_reads_it(store):
    manifest = commit_parts(store)
    paths = store.verified_paths(manifest, "latents")
    assert [p.rsplit("/", 2)[-2:] for p in paths] == [["latents", "part-0.parquet"], ["latents", "part-1.parquet"]]
    assert pq.read_table(paths, filesystem=store.pa_filesystem).num_rows == 200  # what ray.data.read_parquet gets
    assert store.verified_paths(manifest, "latents/part-1.parquet") == paths[1:]

    data = store.fs.cat_file(paths[1])
    middle = len(data) // 2
    store.fs.pipe_file(paths[1], data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :])  # one bit, same size
    with pytest.raises(
        IntegrityError, match=r"file 'latents/part-1.parquet' of latents/0123456789abcdef .* corrupt \(sha256"
    ):
        store.verified_paths(manifest, "latents")
    store.fs.rm(paths[0])
    with pytest.raises(IntegrityError, match="'latents/part-0.parquet' .* is missing"):
        store.verified_paths(manifest, "latents")


# ---------------------------------------------------------------------------------------
# Item 5: a crafted manifest cannot point outside its stage folder


def craft(store: Store, manifest, path: str) -> str:
    """Rewrite ``manifest`` so its one file points at ``path``, with a digest that checks out."""
    body = manifest.model_dump(exclude={"digest"})
    name = next(iter(body["files"]))
    body["files"][name]["path"] = path
    body["digest"] = sha256_hex(canonical_json(body))
    store.fs.pipe_file(f"{store.stage_dir(manifest.stage, manifest.key)}/manifest.json", json.dumps(body).encode())
    return name


@pytest.mark.parametrize(
    "path",
    [
        "../../../secret.txt",
        "attempts/../../../../secret.txt",
        "/etc/passwd",
        "attempts\\x\\..\\..\\secret.txt",
        "attempts/./x",
        "attempts//x",
    ],
)
def test_a_manifest_entry_outside_the_stage_folder_is_refused_on_load(store, path):
    secret = store.backend.join("secret.txt")
    store.backend.write_bytes(secret, b"not yours")
    with store.begin("ingest", "k", config={}) as writer:
        writer.write_bytes("images", b"not yours")  # same bytes: the crafted digest matches the secret
        manifest = writer.commit()
    name = craft(store, manifest, path)
    with pytest.raises(
        IntegrityError,
        match=rf"not a valid manifest \(files\.{name}\.path: path .* is not a relative path inside the stage folder",
    ):
        store.get(manifest.stage, manifest.key)  # today: loads, and read_bytes returns the secret
    with pytest.raises(IntegrityError):
        store.get_ref(manifest.ref)


def test_a_checkpoint_entry_outside_its_folder_is_refused(store):
    checkpoints = store.checkpoints("base", "k")
    checkpoints.save(1, {}, {"step": 1})
    path = f"{checkpoints.step_dir(1)}/manifest.json"
    record = json.loads(store.fs.cat_file(path))
    state = store.fs.cat_file(f"{checkpoints.step_dir(1)}/{record['files']['state.json']['path']}")
    store.backend.write_bytes(store.backend.join("secret"), state)  # what the crafted entry would read
    record["files"]["state.json"]["path"] = "../../../../secret"
    record["digest"] = sha256_hex(canonical_json({k: v for k, v in record.items() if k != "digest"}))
    store.fs.pipe_file(path, json.dumps(record).encode())
    with pytest.raises(IntegrityError, match=r"files\.state\.json\.path: path '\.\./\.\./\.\./\.\./secret'"):
        checkpoints.latest()


# ---------------------------------------------------------------------------------------
# Item 6: data reaches the disk before the manifest that vouches for it


def test_a_local_commit_fsyncs_files_and_folders_before_linking_the_manifest(local_store, monkeypatch):
    events: list[tuple[str, str]] = []
    fsync, link = os.fsync, os.link

    def spy_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_link(source, target, **kwargs) -> None:
        link(source, target, **kwargs)
        events.append(("link", str(target)))

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "link", spy_link)
    with local_store.begin("latents", "0123456789abcdef", config={}) as writer:
        writer.write_bytes("a.bin", b"a")
        local_store.fs.makedirs(f"{writer.prefix}/parts", exist_ok=True)
        pq.write_table(pa.table({"v": [1]}), f"{writer.prefix}/parts/p.parquet")  # written by another engine
        writer.add_files(["parts"])
        manifest = writer.commit()
    monkeypatch.undo()

    stage_dir = local_store.stage_dir("latents", "0123456789abcdef")
    linked = events.index(("link", f"{stage_dir}/manifest.json"))
    before = {path for kind, path in events[:linked] if kind == "fsync"}
    files = {f"{stage_dir}/{entry.path}" for entry in manifest.files.values()}
    folders = {writer.prefix, f"{writer.prefix}/parts", f"{stage_dir}/attempts", stage_dir, os.path.dirname(stage_dir)}
    assert files <= before, f"not fsynced before the manifest: {files - before}"  # today: none of them
    assert folders <= before, f"folders not fsynced before the manifest: {folders - before}"
    assert ("fsync", stage_dir) in events[linked + 1 :]  # the manifest's own name


# ---------------------------------------------------------------------------------------
# Item 7: pointer moves by compare-and-swap; broken records get one clear line


def test_a_pointer_moves_only_from_the_ref_the_caller_read(store):
    refs = []
    for i in range(3):
        with store.begin("consistency", f"key{i}", config={"i": i}) as writer:
            writer.write_json("info", {"i": i})
            refs.append(writer.commit().ref)
    store.put_pointer("serving/current", refs[0], expect=None)
    store.put_pointer("serving/current", refs[1], expect=refs[0])
    with pytest.raises(PointerMoved, match=rf"'serving/current' points at {refs[1]}, not at {refs[0]} as expected"):
        store.put_pointer("serving/current", refs[2], expect=refs[0])
    assert store.get_pointer("serving/current") == refs[1]
    store.put_pointer("serving/current", refs[2])  # no expect: move it whatever it points at
    assert store.get_pointer("serving/current") == refs[2]


def test_racing_promotions_have_one_winner(local_store):
    store = local_store
    refs = []
    for i in range(9):
        with store.begin("consistency", f"key{i}", config={"i": i}) as writer:
            writer.write_json("info", {"i": i})
            refs.append(writer.commit().ref)
    store.put_pointer("serving/current", refs[0])
    barrier, outcomes = threading.Barrier(8), []

    def promote(ref: str) -> None:
        barrier.wait()
        try:
            store.put_pointer("serving/current", ref, expect=refs[0])
            outcomes.append(ref)
        except PointerMoved:
            outcomes.append(None)

    threads = [threading.Thread(target=promote, args=(ref,)) for ref in refs[1:]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [ref for ref in outcomes if ref is not None]
    assert len(outcomes) == 8 and len(winners) == 1
    assert store.get_pointer("serving/current") == winners[0]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env, timeout=120
    )


@pytest.mark.parametrize("folder, name", [("runs", "run-7"), ("pointers", "serving/current")])
def test_status_and_gc_name_a_hand_broken_record_in_one_line(local_store, folder, name):
    store = local_store
    with store.begin("ingest", "k", config={}) as writer:
        writer.write_json("info", {})
        ref = writer.commit().ref
    store.put_pointer("serving/current", ref)
    store.record_run("run-7", {"images": ref})
    path = store.backend.join(folder, f"{name}.json")
    Path(path).write_text(Path(path).read_text()[:25])  # cut short by a hand edit

    status = cli("status", "--store", store.uri)
    assert status.returncode == 0 and "Traceback" not in status.stderr, status.stderr
    damaged = [line for line in status.stdout.splitlines() if line.startswith("damaged")]
    assert len(damaged) == 1 and f"{folder[:-1]} {name}" in damaged[0] and path in damaged[0], status.stdout

    gc = cli("gc", "--store", store.uri, "--yes")
    assert gc.returncode == 0 and "Traceback" not in gc.stderr, gc.stderr
    assert any(line.startswith(f"damaged (left alone): {folder[:-1]} {name}: ") for line in gc.stdout.splitlines()), (
        gc.stdout
    )
    assert store.get("ingest", "k") is not None
